"""/v1/fork, /v1/snapshots and the weights swap, on a model's ChatThaw.

    fork:      prefix (messages, a snapshot, or both: the snapshot's messages first) + suffixes
               -> ``fork_fanout`` (the prefix computed once; with a kv store it is snapshotted,
               else the parent's prefix cache holds it) -> BranchResults -> JSON, or SSE
               events: {"type": "token", "branch": i, ...} while generating, one
               {"type": "branch", ...} per branch at the end, {"type": "done", ...}, [DONE]
    snapshots: ``ChatThaw.asnapshot`` / ``PrefixHandle.save`` / ``ChatThaw.load_snapshot``
    weights:   ``ChatThaw.load_weights(src) -> new weights_version`` (when this build has it),
               with the model's gate closed: requests in flight finish on the old weights,
               new ones wait and run on the new weights
Branch options are checked before the fork starts (names: ``BRANCH_OPTION_NAMES``; values: the
same ``build_options`` + ``validate`` every engine request goes through), so a bad option is a
400 naming ``options.<field>``, not N failed branches.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages, convert_to_openai_messages

from thaw_agents.fanout import BranchResult, fork_fanout
from thaw_agents.options import build_options
from thaw_agents.server.registry import ModelEntry, Registry, SnapshotEntry
from thaw_agents.server.schemas import (
    BRANCH_OPTION_NAMES,
    ApiError,
    ChatMessage,
    ForkRequest,
    Usage,
    param_of,
)
from thaw_agents.server.streaming import DONE, Served, sse
from thaw_agents_core.engine.sampling import GenerationOptions, validate
from thaw_agents_core.fork.prefix import PrefixHandle

# ---------------------------------------------------------------------- fork


def _suffix(value: Any, index: int) -> str | list[BaseMessage]:
    if isinstance(value, str):
        return value
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ApiError(400, f"suffixes[{index}] is an empty list", param=f"suffixes[{index}]")
    return convert_to_messages([m.to_openai() for m in items])


def _branch_options(served: Served, options: Any, num_suffixes: int) -> Any:
    """Checked per-branch options (what ``fork_fanout`` takes), or 400 naming the field."""
    if options is None:
        return None
    table = [options] if isinstance(options, dict) else list(options)
    if not isinstance(options, dict) and len(table) != num_suffixes:
        raise ApiError(
            400,
            f"options has {len(table)} entries for {num_suffixes} suffixes: "
            "pass one dict for all branches or one per suffix",
            param="options",
        )
    defaults = served.llm.generation_defaults()
    context = served.llm.engine.max_model_len
    checked = []
    for i, values in enumerate(table):
        where = "options" if isinstance(options, dict) else f"options[{i}]"
        unknown = sorted(set(values) - set(BRANCH_OPTION_NAMES))
        if unknown:
            raise ApiError(
                400,
                f"unknown branch option(s) {unknown} in {where}; valid: "
                f"{', '.join(BRANCH_OPTION_NAMES)}",
                param=f"{where}.{unknown[0]}",
            )
        values = dict(values)
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        try:
            validate(
                GenerationOptions.from_mapping(build_options(defaults, values)),
                max_model_len=context,
            )
        except (TypeError, ValueError) as exc:
            field = param_of(str(exc))
            raise ApiError(
                400, f"{where}: {exc}", param=f"{where}.{field}" if field else where
            ) from exc
        checked.append(values)
    return checked[0] if isinstance(options, dict) else checked


def branch_json(result: BranchResult) -> dict[str, Any]:
    """One branch as JSON: the core result fields, OpenAI usage, the reply as a message."""
    data = result.to_dict()
    data.pop("prefix", None)
    data["suffix_messages"] = convert_to_openai_messages(result.suffix_messages)
    data["usage"] = Usage.of(
        result.prompt_tokens, len(result.token_ids), result.cached_tokens
    ).model_dump()
    data["message"] = {"role": "assistant", "content": result.text}
    return data


def _prefix_json(handle: PrefixHandle | None) -> dict[str, Any] | None:
    if handle is None:
        return None
    return {
        "snapshot_id": handle.snapshot_id,
        "num_tokens": handle.num_tokens,
        "num_snapshot_tokens": handle.num_snapshot_tokens,
    }


class ForkCall:
    """One /v1/fork request, checked and ready to run."""

    def __init__(
        self,
        served: Served,
        registry: Registry,
        request: ForkRequest,
        limit: int | None,
        max_branches: int,
    ) -> None:
        self.served, self.request = served, request
        num_branches = len(request.suffixes) * request.n
        if num_branches > max_branches:
            raise ApiError(
                400,
                f"{len(request.suffixes)} suffixes x n={request.n} = "
                f"{num_branches} branches; this server runs at most "
                f"{max_branches} per request",
                param="n",
            )
        snapshot = served.snapshot
        if request.snapshot is not None:
            snapshot = registry.snapshot(request.snapshot)
            if snapshot.model != served.entry.name:
                raise ApiError(
                    400,
                    f"snapshot {request.snapshot!r} was made by model "
                    f"{snapshot.model!r}, not {served.entry.name!r}",
                    param="snapshot",
                )
            served.snapshot = snapshot
        self.suffixes = [_suffix(s, i) for i, s in enumerate(request.suffixes)]
        self.prefix: list[BaseMessage] | PrefixHandle
        if snapshot is not None and not request.messages:
            self.prefix = snapshot.handle
            prefix_messages = snapshot.messages()
        else:
            prefix_messages = served.messages(request.messages)
            self.prefix = prefix_messages
        if not prefix_messages:
            raise ApiError(400, "a fork needs a prefix: messages, or a snapshot", param="messages")
        for suffix in self.suffixes:
            extra = convert_to_messages([suffix]) if isinstance(suffix, str) else suffix
            served.count_prompt([*prefix_messages, *extra], limit)
        self.options = _branch_options(served, request.options, len(self.suffixes))

    async def run(self, on_token: Any = None) -> list[BranchResult]:
        return await fork_fanout(
            self.served.llm,
            self.prefix,
            self.suffixes,
            n=self.request.n,
            options=self.options,
            timeout_s=self.request.timeout_s,
            on_token=on_token,
        )

    def response(self, results: list[BranchResult]) -> dict[str, Any]:
        served = self.served
        usage = sum(
            (Usage.of(r.prompt_tokens, len(r.token_ids), r.cached_tokens) for r in results), Usage()
        )
        handle = next((r.prefix for r in results if r.prefix is not None), None)
        return {
            "id": served.request_id,
            "object": "fork",
            "created": served.created,
            "model": served.model,
            "system_fingerprint": served.fingerprint,
            "prefix": _prefix_json(handle),
            "branches": [branch_json(r) for r in results],
            "usage": usage.model_dump(),
        }

    async def events(self) -> AsyncIterator[str]:
        """SSE: token events as branches generate, then each branch's result, then done."""
        n = self.request.n
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(index: int, text: str) -> None:  # may come from another thread (pools)
            loop.call_soon_threadsafe(queue.put_nowait, (index, text))

        task = asyncio.create_task(self.run(on_token))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                finished = task.done()
                if getter.done():
                    pending = [getter.result()]
                else:
                    getter.cancel()
                    pending = []
                if finished:
                    await asyncio.sleep(0)  # tokens handed over just before the end
                while not queue.empty():
                    pending.append(queue.get_nowait())
                for index, text in pending:
                    yield sse(
                        {
                            "type": "token",
                            "branch": index,
                            "suffix_index": index // n,
                            "sample_index": index % n,
                            "text": text,
                        }
                    )
                if finished:
                    break
            results = task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        body = self.response(results)
        for branch in body.pop("branches"):
            yield sse({"type": "branch", "branch": branch["index"], **branch})
        yield sse({"type": "done", **body})
        yield DONE


# ---------------------------------------------------------------------- snapshots


def require_store(entry: ModelEntry) -> None:
    if entry.llm.kv_store is None:
        raise ApiError(
            400,
            f"model {entry.name!r} has no KV store, so it cannot keep "
            "snapshots: start the server with --kv-store auto (or "
            "shm://NAME?capacity=1GiB, or a directory)",
            param="model",
            code="no_kv_store",
        )


async def create_snapshot(
    served: Served,
    registry: Registry,
    messages: list[ChatMessage],
    name: str | None,
    limit: int | None,
) -> SnapshotEntry:
    entry = served.entry
    require_store(entry)
    prefix = served.messages(messages)
    num_tokens = served.count_prompt(prefix, limit, add_generation_prompt=False)
    block_size = entry.llm.kv_namespace().block_size
    if num_tokens < block_size:
        raise ApiError(
            400,
            f"the prefix has {num_tokens} tokens; a snapshot holds whole KV "
            f"blocks of {block_size} tokens: send at least {block_size}",
            param="messages",
            code="prefix_too_short",
        )
    handle = await entry.llm.asnapshot(prefix)
    return registry.add_snapshot(entry.name, handle, name)


def delete_snapshot(registry: Registry, key: str) -> dict[str, Any]:
    snapshot = registry.snapshot(key)
    entry = registry.models.get(snapshot.model)
    removed = False
    if entry is not None and entry.llm.engine.is_started:
        removed = entry.llm.engine.store.delete(snapshot.handle.ref)
    registry.remove_snapshot(key)
    return {"id": snapshot.id, "object": "snapshot", "deleted": True, "store_deleted": removed}


async def save_snapshot(registry: Registry, key: str, dest: str) -> dict[str, Any]:
    snapshot = registry.snapshot(key)
    path = await asyncio.to_thread(snapshot.handle.save, dest)
    return {"id": snapshot.id, "object": "snapshot", "saved_to": path}


async def load_snapshot(
    registry: Registry, entry: ModelEntry, src: str, name: str | None
) -> SnapshotEntry:
    require_store(entry)
    handle = await asyncio.to_thread(entry.llm.load_snapshot, src)
    return registry.add_snapshot(entry.name, handle, name)


# ---------------------------------------------------------------------- weights


async def load_weights(entry: ModelEntry, src: str) -> dict[str, Any]:
    """Hot swap ``entry``'s weights through ``ChatThaw.load_weights`` (501 where absent)."""
    swap = getattr(entry.llm, "load_weights", None)
    if swap is None:
        raise ApiError(
            501,
            "this build of thaw-agents cannot swap weights: "
            "ChatThaw.load_weights is not available; restart the server on "
            "the new weights instead",
            type="not_implemented",
            code="not_implemented",
        )
    if not src.startswith("s3://") and not os.path.exists(src):
        raise ApiError(
            400,
            f"no weights snapshot at {src!r} (a .thaw file on the server)",
            param="src",
            code="not_found",
        )
    previous = entry.weights_version
    await entry.gate.acquire_write()  # in-flight requests finish; new ones wait
    try:
        await asyncio.to_thread(swap, src)
    finally:
        entry.gate.release_write()
    return {
        "model": entry.name,
        "object": "weights",
        "previous_weights_version": previous,
        "weights_version": entry.weights_version,
    }
