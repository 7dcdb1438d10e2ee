"""fork_fanout: one shared prefix, N branches, each starting from the prefix's KV cache.

Input flow
    prefix (messages, or a PrefixHandle) + suffixes (strings / messages / message lists)
      -> render the prefix once; ``ChatThaw.asnapshot``: the parent engine computes it once and
         (with a kv_store) snapshots it; without a store the parent only warms its prefix cache
      -> each branch prompt = prefix ids + the ids of the text its suffix adds after the prefix
         (so every engine finds the prefix: the parent in its cache, workers in the store)
      -> ``forking.run_branches``: parent engine or pool workers (routing rule documented there)
Output flow
    one ``BranchResult`` per (suffix, sample): text, token ids, finish_reason, usage with
    ``cache_read`` = prefix tokens the branch did not compute, timings, engine, or the error
    (a failed branch is reported, the others are kept). Branch tokens are dispatched as
    LangChain custom events ("thaw_branch_token"), visible in ``astream_events``.
Forks of forks: ``result.messages`` (prefix + suffix + reply) is the next fanout's prefix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    messages_from_dict,
    messages_to_dict,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.runnables import RunnableConfig

from thaw_agents import messages as msg
from thaw_agents.options import build_options
from thaw_agents.outputs import PROVIDER, usage_metadata
from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.engine.sampling import GenerationOptions
from thaw_agents_core.fork import branches as forking
from thaw_agents_core.fork.branches import Branch, Route
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.pool.fork_pool import ForkPool

if TYPE_CHECKING:
    from thaw_agents.chat_model import ChatThaw

Suffix = str | BaseMessage | Sequence[BaseMessage]
TokenCallback = Callable[[int, str], None]
BRANCH_TOKEN_EVENT = "thaw_branch_token"


@dataclass
class BranchResult(GenerationResult):
    """One branch of a fork_fanout: the core ``GenerationResult`` (text, token_ids,
    finish_reason, prompt/cached token counts, ttft_s/total_s, engine, retries, error, logprobs)
    plus what LangChain needs to continue from it."""

    prefix: PrefixHandle | None = None
    prefix_messages: list[BaseMessage] = field(default_factory=list)
    suffix_messages: list[BaseMessage] = field(default_factory=list)
    model_name: str = ""

    @property
    def usage(self) -> UsageMetadata:
        """input/output/total tokens; ``input_token_details.cache_read`` = prefix tokens reused."""
        return usage_metadata(self.prompt_tokens, len(self.token_ids), self.cached_tokens)

    @property
    def timings(self) -> dict[str, float | None]:
        """``ttft_s`` (submit to first token) and ``total_s``."""
        return {"ttft_s": self.ttft_s, "total_s": self.total_s}

    @property
    def message(self) -> AIMessage:
        """The branch's reply as an AIMessage (usage and metadata attached)."""
        metadata: dict[str, Any] = {
            "model_name": self.model_name,
            "finish_reason": self.finish_reason,
            "model_provider": PROVIDER,
            "engine": self.engine,
            **self.timings,
        }
        if self.logprobs:
            metadata["logprobs"] = {"content": self.logprobs}
        return AIMessage(content=self.text, usage_metadata=self.usage, response_metadata=metadata)

    @property
    def messages(self) -> list[BaseMessage]:
        """prefix + suffix + reply: the prefix of a fork of this branch."""
        return [*self.prefix_messages, *self.suffix_messages, self.message]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (for LangGraph state and checkpointers)."""
        data = {f.name: getattr(self, f.name) for f in fields(GenerationResult)}
        return {
            **data,
            "usage": dict(self.usage),
            "timings": self.timings,
            "prefix": self.prefix.to_json() if self.prefix else None,
            "suffix_messages": messages_to_dict(self.suffix_messages),
        }


def prefix_messages_of(handle: PrefixHandle) -> list[BaseMessage]:
    """The messages a handle was made from (saved in it by ``ChatThaw.snapshot``)."""
    data = handle.extra.get("messages")
    if data is None:
        raise ValueError(
            "this PrefixHandle carries no messages (it was made from token ids); "
            "pass the prefix messages instead"
        )
    return messages_from_dict(data)


def _suffix_messages(suffix: Suffix) -> list[BaseMessage]:
    if isinstance(suffix, str):
        return [HumanMessage(suffix)]
    if isinstance(suffix, BaseMessage):
        return [suffix]
    messages = list(suffix)
    if not messages or not all(isinstance(m, BaseMessage) for m in messages):
        raise ValueError(
            f"a suffix must be a string, a message or a non-empty list of messages; got {suffix!r}"
        )
    return messages


def branch_prompt(
    tokenizer: Any,
    prefix: msg.RenderedPrompt,
    prefix_messages: Sequence[BaseMessage],
    suffix: Sequence[BaseMessage],
) -> list[int]:
    """prefix ids + ids of what the suffix adds: the prefix's ids are kept exactly."""
    full = msg.render(tokenizer, [*prefix_messages, *suffix], add_generation_prompt=True)
    if not full.text.startswith(prefix.text):
        raise ValueError(
            "this chat template does not render the prefix as the start of the "
            "longer conversation, so branches cannot share its KV"
        )
    rest = tokenizer.encode(full.text[len(prefix.text) :], add_special_tokens=False)
    return [*prefix.token_ids, *rest]


def _branch_options(
    llm: ChatThaw,
    options: dict[str, Any] | Sequence[dict[str, Any]] | None,
    num_suffixes: int,
    n: int,
) -> list[list[GenerationOptions]]:
    if options is None or isinstance(options, dict):
        per_suffix = [dict(options or {})] * num_suffixes
    else:
        per_suffix = [dict(o or {}) for o in options]
        if len(per_suffix) != num_suffixes:
            raise ValueError(f"{len(per_suffix)} option dicts for {num_suffixes} suffixes")
    defaults = llm.generation_defaults()
    table = []
    for values in per_suffix:
        merged = build_options(defaults, values)
        samples = []
        for k in range(n):
            sample = dict(merged)
            if "seed" in sample and n > 1:
                sample["seed"] = int(sample["seed"]) + k  # n samples: distinct, reproducible
            samples.append(GenerationOptions.from_mapping(sample))
        table.append(samples)
    return table


def _result(
    llm: ChatThaw,
    outcome: GenerationResult,
    handle: PrefixHandle | None,
    prefix_messages: list[BaseMessage],
    suffix: list[BaseMessage],
) -> BranchResult:
    return BranchResult.from_wire(
        outcome.to_wire(),
        prefix=handle,
        prefix_messages=prefix_messages,
        suffix_messages=suffix,
        model_name=llm.model_name,
    )


def _event_sink(
    config: RunnableConfig | None, on_token: TokenCallback | None, branches: list[Branch]
) -> forking.DeltaCallback:
    """Branch tokens -> the user's callback, LangGraph's custom stream and LangChain custom
    events (``astream_events``). The graph's writer and run config are captured here, in the
    caller's context: pool deltas arrive later from another thread's callback."""
    from langchain_core.callbacks.manager import adispatch_custom_event
    from langchain_core.runnables.config import ensure_config

    loop = asyncio.get_running_loop()
    run_config = ensure_config(config)
    try:
        from langgraph.config import get_stream_writer

        writer = get_stream_writer()
    except (ImportError, RuntimeError, KeyError):  # KeyError: a LangChain run, not a graph's
        writer = None
    pending: set[asyncio.Task] = set()
    events = {"enabled": bool(run_config.get("callbacks"))}

    async def dispatch(payload: dict[str, Any]) -> None:
        try:
            await adispatch_custom_event(BRANCH_TOKEN_EVENT, payload, config=run_config)
        except RuntimeError:  # not inside a LangChain run: nobody is listening
            events["enabled"] = False

    def sink(index: int, text: str) -> None:
        if on_token is not None:
            on_token(index, text)
        branch = branches[index]
        payload = {
            "branch": index,
            "suffix_index": branch.suffix_index,
            "sample_index": branch.sample_index,
            "text": text,
        }
        if writer is not None:
            writer(payload)
        if events["enabled"]:
            task = loop.create_task(dispatch(payload))
            pending.add(task)
            task.add_done_callback(pending.discard)

    return sink


async def fork_fanout(
    llm: ChatThaw,
    prefix: Sequence[BaseMessage] | str | PrefixHandle,
    suffixes: Sequence[Suffix],
    *,
    n: int = 1,
    options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    pool: ForkPool | None = None,
    route: Route = "auto",
    timeout_s: float | None = None,
    on_token: TokenCallback | None = None,
    config: RunnableConfig | None = None,
) -> list[BranchResult]:
    """Compute ``prefix`` once, then run every suffix (``n`` samples each) from its KV cache.

    ``options``: generation options (temperature, max_tokens, seed, stop, ...) for all branches
    (a dict) or per suffix (a list of dicts); the model's own fields are the defaults. With a
    ``seed`` and ``n > 1``, sample k uses ``seed + k``. ``pool``: a started ForkPool of warm
    workers (``llm.fork_pool(...)``); ``route``: "auto" | "parent" | "pool" (rule in
    thaw_agents_core/forking.py). ``on_token(branch_index, text)`` sees every streamed piece.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not suffixes:
        raise ValueError("fork_fanout needs at least one suffix")
    if pool is not None and llm.kv_store is None:
        raise ValueError(
            "pool workers load the prefix from a snapshot: create the model with "
            "ChatThaw(kv_store='auto') (or another store)"
        )
    if not llm.engine.is_started:
        await asyncio.to_thread(llm.engine.start)
    tokenizer = llm.engine.tokenizer
    if isinstance(prefix, PrefixHandle):
        handle: PrefixHandle | None = prefix
        prefix_messages = prefix_messages_of(prefix)
    else:
        prefix_messages = llm._convert_input(prefix).to_messages()
        handle = None
    rendered = llm.render_prefix(prefix_messages)
    if (
        handle is None
        and llm.kv_store is not None
        and len(rendered.token_ids) >= llm.kv_namespace().block_size
    ):
        handle = await llm.asnapshot(prefix_messages)
    elif handle is None:  # no store, or less than a block: warm the parent's prefix cache only
        await llm.engine.run_prefill(rendered.token_ids)
    suffix_lists = [_suffix_messages(s) for s in suffixes]
    table = _branch_options(llm, options, len(suffix_lists), n)
    branches = [
        Branch(branch_prompt(tokenizer, rendered, prefix_messages, suffix), opts, si, k)
        for si, suffix in enumerate(suffix_lists)
        for k, opts in enumerate(table[si])
    ]
    outcomes = await forking.run_branches(
        llm.engine,
        branches,
        pool=pool,
        route=route,
        timeout_s=timeout_s,
        on_delta=_event_sink(config, on_token, branches),
    )
    return [
        _result(llm, o, handle, prefix_messages, suffix_lists[o.suffix_index]) for o in outcomes
    ]


def fork_fanout_sync(
    llm: ChatThaw,
    prefix: Sequence[BaseMessage] | str | PrefixHandle,
    suffixes: Sequence[Suffix],
    **kwargs: Any,
) -> list[BranchResult]:
    """Blocking ``fork_fanout``; works from plain code and inside a running event loop."""
    coro = fork_fanout(llm, prefix, suffixes, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as executor:  # Jupyter: a loop is running
        return executor.submit(asyncio.run, coro).result()
