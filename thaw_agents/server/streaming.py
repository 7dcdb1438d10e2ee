"""What every generating route shares: the request's context, error translation and SSE.

SSE framing is OpenAI's: ``data: <json>\\n\\n`` per event, ``data: [DONE]\\n\\n`` at the end; an
error after the stream started is one ``data: {"error": {...}}`` event before ``[DONE]``.
A stream is *primed* before the HTTP response starts: its first event is awaited in the route,
so a request that fails validation (or the engine's) gets a plain 4xx JSON error instead of a
200 stream that breaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages

from thaw_agents import messages as msg
from thaw_agents.server.registry import ModelEntry, SnapshotEntry
from thaw_agents.server.schemas import (
    ApiError,
    ChatMessage,
    fingerprint,
    new_id,
    now_s,
    param_of,
)
from thaw_agents_core.engine.engine import EngineError
from thaw_agents_core.snapshot.errors import SnapshotError, SnapshotMismatchError
from thaw_agents_core.store.base import SnapshotNotFoundError

logger = logging.getLogger("thaw_agents.server")
DONE = "data: [DONE]\n\n"
_END = object()


@dataclass
class Served:
    """One request's model (and snapshot, when ``model`` named one) plus its response ids."""

    entry: ModelEntry
    snapshot: SnapshotEntry | None
    model: str
    """The name the request used (echoed in ``model``)."""
    id_prefix: str = "chatcmpl"
    request_id: str = field(default="", init=False)
    created: int = field(default_factory=now_s, init=False)
    weights_version: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.request_id = new_id(self.id_prefix)
        self.weights_version = self.entry.weights_version  # fixed: the gate is held

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.weights_version)

    @property
    def llm(self) -> Any:
        return self.entry.llm

    def messages(self, messages: Sequence[ChatMessage] | None) -> list[BaseMessage]:
        """The snapshot's messages (if any) + the request's, as LangChain messages."""
        prefix = self.snapshot.messages() if self.snapshot is not None else []
        try:
            return [*prefix, *convert_to_messages([m.to_openai() for m in messages or []])]
        except (ValueError, TypeError, KeyError) as exc:
            raise ApiError(400, f"bad messages: {exc}", param="messages") from exc

    def count_prompt(
        self,
        messages: Sequence[BaseMessage],
        limit: int | None,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> int:
        """Tokens of the rendered prompt; 400 when over ``limit`` or the context."""
        rendered = msg.render(
            self.llm.engine.tokenizer,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
        )
        return self.check_length(len(rendered.token_ids), limit)

    def check_length(self, num_tokens: int, limit: int | None, field_name: str = "messages") -> int:
        context = self.llm.engine.max_model_len
        if limit is not None and num_tokens > limit:
            raise ApiError(
                400,
                f"the prompt has {num_tokens} tokens; this server accepts at "
                f"most {limit} (--max-prompt-tokens)",
                param=field_name,
                code="context_length_exceeded",
            )
        if num_tokens >= context:
            raise ApiError(
                400,
                f"the prompt has {num_tokens} tokens; the model's context "
                f"holds {context} (prompt + output)",
                param=field_name,
                code="context_length_exceeded",
            )
        return num_tokens


def to_api_error(exc: BaseException, *, prompt_field: str = "messages") -> ApiError:
    """Any exception of a request -> the OpenAI error the client gets."""
    if isinstance(exc, ApiError):
        return exc
    text = str(exc)
    if isinstance(exc, SnapshotMismatchError):
        return ApiError(400, text, code="snapshot_mismatch")
    if isinstance(exc, SnapshotError):
        return ApiError(400, text, code="snapshot_error")
    if isinstance(exc, SnapshotNotFoundError):
        return ApiError(404, text, code="snapshot_not_found")
    if isinstance(exc, FileNotFoundError):
        return ApiError(400, text, param="src", code="not_found")
    if isinstance(exc, ValueError):
        return ApiError(400, text, param=param_of(text, prompt_field=prompt_field))
    if isinstance(exc, TimeoutError):
        return ApiError(504, text, type="timeout", code="timeout")
    if isinstance(exc, EngineError):
        return ApiError(
            503,
            f"the engine is unavailable: {text}",
            type="server_error",
            code="engine_unavailable",
            headers={"Retry-After": "5"},
        )
    logger.error("request failed", exc_info=exc)
    return ApiError(
        500,
        f"internal error: {type(exc).__name__}: {text}",
        type="server_error",
        code="internal_error",
    )


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def merge(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as (index, item), as they come; the first error
    is raised; closing the merge cancels every stream (their engine requests abort)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))
            return
        await queue.put((index, _END, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def primed(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Await the first event now (errors raise here, before any response); return an
    iterator over all events."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise

    async def rest() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return rest()


async def guarded(events: AsyncIterator[str], prompt_field: str = "messages") -> AsyncIterator[str]:
    """An SSE stream whose mid-stream errors become one error event and ``[DONE]``."""
    started = False
    try:
        async for event in events:
            started = True
            yield event
    except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
        if not started:
            raise
        yield sse(to_api_error(exc, prompt_field=prompt_field).body())
        yield DONE
