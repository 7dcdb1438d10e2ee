"""ChatThaw's prefix snapshots: render a prefix once, have the engine compute and save it.

    messages --render (no generation prompt)--> prefix token ids
      --forking.asnapshot_ids: one request, max_tokens=1, {"thaw": {"save": True}}-->
    engine: prefill (reusing its prefix cache) -> connector saves the full blocks
      --> PrefixHandle (+ the prefix messages, so branches can be rendered after it)
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Sequence

from langchain_core.messages import BaseMessage, messages_from_dict, messages_to_dict

from thaw_agents import messages as msg
from thaw_agents_core.fork import branches as forking
from thaw_agents_core.fork.prefix import PrefixHandle

if TYPE_CHECKING:
    from thaw_agents.chat_model import ChatThaw


def require_store(llm: ChatThaw) -> None:
    if llm.kv_store is None:
        raise ValueError(
            "snapshots need a KV store: create the model with ChatThaw(kv_store='auto') (a "
            "shared-memory store for this process), kv_store='shm://NAME?capacity=2GiB' or a "
            "directory path"
        )


def render_prefix(llm: ChatThaw, messages: Sequence[BaseMessage]) -> msg.RenderedPrompt:
    """The prefix as the chat template renders it inside a longer conversation."""
    return msg.render(llm.engine.tokenizer, messages, add_generation_prompt=False)


def _extra(messages: Sequence[BaseMessage], extra: dict[str, Any] | None) -> dict[str, Any]:
    """Saved in the snapshot's header too, so a hydrated handle can still render branches."""
    return {**(extra or {}), "messages": messages_to_dict(messages)}


def _complete(llm: ChatThaw, handle: PrefixHandle, rendered: msg.RenderedPrompt,
              extra: dict[str, Any]) -> PrefixHandle:
    return dataclasses.replace(handle, model_name=llm.model_name, prefix_text=rendered.text,
                               extra={**handle.extra, **extra})


def prefix_messages(handle: PrefixHandle) -> list[BaseMessage]:
    """The messages a handle was made from (saved in it by ChatThaw.snapshot)."""
    data = handle.extra.get("messages")
    if data is None:
        raise ValueError("this PrefixHandle carries no messages (it was made from token ids); "
                         "pass the prefix messages instead")
    return messages_from_dict(data)


def snapshot(llm: ChatThaw, messages: Sequence[BaseMessage],
             extra: dict[str, Any] | None) -> PrefixHandle:
    require_store(llm)
    rendered = render_prefix(llm, messages)
    extra = _extra(messages, extra)
    handle = forking.snapshot_ids(llm.engine, rendered.token_ids, extra)
    return _complete(llm, handle, rendered, extra)


async def asnapshot(llm: ChatThaw, messages: Sequence[BaseMessage],
                    extra: dict[str, Any] | None) -> PrefixHandle:
    require_store(llm)
    if not llm.engine.is_started:  # first use: model build and engine start off the loop
        import asyncio

        await asyncio.to_thread(llm.engine.start)
    rendered = render_prefix(llm, messages)
    extra = _extra(messages, extra)
    handle = await forking.asnapshot_ids(llm.engine, rendered.token_ids, extra)
    return _complete(llm, handle, rendered, extra)


def load(llm: ChatThaw, src: str | os.PathLike[str]) -> PrefixHandle:
    require_store(llm)
    engine = llm.engine
    return PrefixHandle.load(src, engine.store, store_url=engine.store_url or "",
                             expect_namespace=engine.namespace(), model_name=llm.model_name)
