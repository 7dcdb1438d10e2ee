"""ChatThaw's prefix snapshots: render a prefix once, have the engine compute and save it.

    messages --render (no generation prompt)--> prefix token ids
      --one request, max_tokens=1, kv_transfer_params {"thaw": {"save": True}}-->
    engine: prefill (reusing its prefix cache) -> connector saves the full blocks
      --RequestOutput.kv_transfer_params["thaw"]["snapshot"]--> PrefixHandle
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Sequence

from langchain_core.messages import BaseMessage

from thaw_agents import messages as msg
from thaw_agents_core.prefix import PARAMS_KEY, PrefixHandle
from thaw_agents_core.sampling import GenerationOptions, to_sampling_params
from thaw_agents_core.snapshot_format import SnapshotError

if TYPE_CHECKING:
    from thaw_agents.chat_model import ChatThaw


def _require_store(llm: "ChatThaw") -> None:
    if llm.kv_store is None:
        raise ValueError(
            "snapshots need a KV store: create the model with ChatThaw(kv_store='auto') (a "
            "shared-memory store for this process), kv_store='shm://NAME?capacity=2GiB' or a "
            "directory path"
        )


def render_prefix(llm: "ChatThaw", messages: Sequence[BaseMessage]) -> msg.RenderedPrompt:
    """The prefix as the chat template renders it inside a longer conversation."""
    return msg.render(llm.engine.tokenizer, messages, add_generation_prompt=False)


def _request(llm: "ChatThaw", prompt_ids: list[int], extra: dict[str, Any] | None) -> Any:
    options = GenerationOptions(max_tokens=1, temperature=0.0, kv_transfer_params={
        PARAMS_KEY: {"save": True, "extra": dict(extra or {})}})
    return to_sampling_params(options, stream=False)


def _handle(llm: "ChatThaw", rendered: msg.RenderedPrompt, output: Any) -> PrefixHandle:
    params = (getattr(output, "kv_transfer_params", None) or {}).get(PARAMS_KEY) or {}
    result = params.get("snapshot")
    if not result:
        raise SnapshotError("the engine returned no snapshot result: is ThawConnector loaded?")
    if not result.get("ok"):
        raise SnapshotError(f"snapshot failed: {result.get('error')}")
    return PrefixHandle(
        snapshot_id=result["snapshot_id"], namespace_key=result["namespace_key"],
        namespace=result["namespace"], store=llm.engine.store_url or result["store"],
        prefix_token_ids=list(rendered.token_ids), num_snapshot_tokens=result["num_tokens"],
        model_name=llm.model_name, prefix_text=rendered.text,
    )


def _check_length(llm: "ChatThaw", rendered: msg.RenderedPrompt) -> None:
    max_len = llm.max_model_len or llm.engine.max_model_len
    if len(rendered.token_ids) >= max_len:
        raise ValueError(f"the prefix has {len(rendered.token_ids)} tokens; the engine's context "
                         f"holds max_model_len={max_len}")


def snapshot(llm: "ChatThaw", messages: Sequence[BaseMessage],
             extra: dict[str, Any] | None) -> PrefixHandle:
    _require_store(llm)
    rendered = render_prefix(llm, messages)
    _check_length(llm, rendered)
    final = None
    for final in llm.engine.stream_sync(rendered.token_ids, _request(llm, rendered.token_ids,
                                                                     extra)):
        pass
    return _handle(llm, rendered, final)


async def asnapshot(llm: "ChatThaw", messages: Sequence[BaseMessage],
                    extra: dict[str, Any] | None) -> PrefixHandle:
    _require_store(llm)
    if not llm.engine.is_started:  # first use: model build and engine start off the loop
        await asyncio.to_thread(llm.engine.start)
    rendered = render_prefix(llm, messages)
    _check_length(llm, rendered)
    final = None
    async for final in llm.engine.stream(rendered.token_ids, _request(llm, rendered.token_ids,
                                                                      extra)):
        pass
    return _handle(llm, rendered, final)


def load(llm: "ChatThaw", src: str | os.PathLike[str]) -> PrefixHandle:
    _require_store(llm)
    engine = llm.engine
    return PrefixHandle.load(src, engine.store, store_url=engine.store_url or "",
                             expect_namespace=engine.namespace(), model_name=llm.model_name)
