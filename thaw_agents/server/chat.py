"""/v1/chat/completions and /v1/completions on a model's ChatThaw / Engine.

    chat:        OpenAI messages -> LangChain messages (snapshot's first, if ``model`` names one)
                 -> ``ChatThaw.ainvoke`` / ``astream`` with the request's params as call kwargs
                 (ChatThaw plans, validates and batches; n choices = n concurrent calls)
                 -> AIMessage / AIMessageChunks -> OpenAI choices / chunks
    completions: a raw prompt (text or token ids, no chat template) -> the model's ``Engine``
                 with options from ``build_options`` (the same defaults and checks) ->
                 core ``GenerationResult`` -> OpenAI text choices
Usage is OpenAI's, with ``prompt_tokens_details.cached_tokens`` = the prompt tokens the engine
did not compute (its prefix cache, or a loaded snapshot).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from langchain_core.messages import AIMessage

from thaw_agents import messages as msg
from thaw_agents.options import build_options
from thaw_agents.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_chunk,
    completion_logprobs,
)
from thaw_agents.server.streaming import DONE, Served, merge, sse
from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params

FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


def finish_reason(reason: str | None) -> str:
    return reason if reason in FINISH_REASONS else "stop"


def choice_kwargs(kwargs: dict[str, Any], k: int, n: int) -> dict[str, Any]:
    """Choice k of n: with a seed, sample k uses seed + k (distinct, reproducible)."""
    if n > 1 and kwargs.get("seed") is not None:
        return {**kwargs, "seed": int(kwargs["seed"]) + k}
    return kwargs


async def gather_all(calls: list[Awaitable[Any]]) -> list[Any]:
    """All results, or the first error with the other calls cancelled (requests aborted)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


# ---------------------------------------------------------------------- chat


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": msg.dumps_args(c["args"])},
        }
        for c in calls
    ]


def chat_choice(index: int, message: AIMessage) -> dict[str, Any]:
    meta = message.response_metadata or {}
    content = msg.text_of(message.content)
    body: dict[str, Any] = {
        "role": "assistant",
        "content": content if content or not message.tool_calls else None,
    }
    if message.tool_calls:
        body["tool_calls"] = _tool_calls(message.tool_calls)
    return {
        "index": index,
        "message": body,
        "logprobs": meta.get("logprobs"),
        "finish_reason": finish_reason(meta.get("finish_reason")),
    }


async def chat_completion(
    served: Served, request: ChatCompletionRequest, limit: int | None
) -> dict[str, Any]:
    messages = served.messages(request.messages)
    served.count_prompt(messages, limit, tools=request.tool_dicts())
    kwargs = request.call_kwargs()
    replies = await gather_all(
        [
            served.llm.ainvoke(messages, **choice_kwargs(kwargs, k, request.n))
            for k in range(request.n)
        ]
    )
    usage = sum((Usage.from_langchain(r.usage_metadata) for r in replies), Usage())
    return {
        "id": served.request_id,
        "object": "chat.completion",
        "created": served.created,
        "model": served.model,
        "system_fingerprint": served.fingerprint,
        "choices": [chat_choice(i, r) for i, r in enumerate(replies)],
        "usage": usage.model_dump(),
    }


async def chat_events(
    served: Served, request: ChatCompletionRequest, limit: int | None
) -> AsyncIterator[str]:
    """SSE events of a streamed chat completion (n choices interleaved by ``index``)."""
    messages = served.messages(request.messages)
    served.count_prompt(messages, limit, tools=request.tool_dicts())
    kwargs = request.call_kwargs()
    streams = [
        served.llm.astream(messages, **choice_kwargs(kwargs, k, request.n))
        for k in range(request.n)
    ]

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        return sse(
            chat_chunk(
                served.request_id, served.created, served.model, served.fingerprint, choices, usage
            )
        )

    started: set[int] = set()
    usage = Usage()
    async for index, piece in merge(streams):  # piece: an AIMessageChunk of choice ``index``
        if index not in started:
            started.add(index)
            yield chunk(
                [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        content = msg.text_of(piece.content)
        logprobs = (piece.response_metadata or {}).get("logprobs")
        if content or logprobs:
            yield chunk(
                [
                    {
                        "index": index,
                        "delta": {"content": content},
                        "logprobs": logprobs,
                        "finish_reason": None,
                    }
                ]
            )
        if piece.chunk_position != "last":
            continue
        if piece.tool_call_chunks:
            calls = [
                {
                    "index": c["index"],
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["args"]},
                }
                for c in piece.tool_call_chunks
            ]
            yield chunk(
                [
                    {
                        "index": index,
                        "delta": {"tool_calls": calls},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        usage = usage + Usage.from_langchain(piece.usage_metadata)
        reason = finish_reason((piece.response_metadata or {}).get("finish_reason"))
        yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if request.stream_options is not None and request.stream_options.include_usage:
        yield chunk([], usage)
    yield DONE


# ---------------------------------------------------------------------- completions


def _prompt_ids(served: Served, request: CompletionRequest, limit: int | None) -> list[list[int]]:
    tokenizer = served.llm.engine.tokenizer
    vocab = len(tokenizer)
    prompts = []
    for prompt in request.prompts():
        if isinstance(prompt, str):
            ids = list(tokenizer.encode(prompt, add_special_tokens=True))
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(
                    400,
                    f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        served.check_length(len(ids), limit, "prompt")
        prompts.append(ids)
    return prompts


async def _raw_stream(
    served: Served, prompt_ids: list[int], kwargs: dict[str, Any]
) -> AsyncIterator[tuple[str, list[dict[str, Any]], GenerationResult]]:
    """One engine request: (new text, new logprob entries, the result so far) per output."""
    llm, engine = served.llm, served.llm.engine
    options = GenerationOptions.from_mapping(build_options(llm.generation_defaults(), kwargs))
    params = to_sampling_params(options, stream=True, max_model_len=engine.max_model_len)
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    began = time.perf_counter()
    async for out in engine.stream(prompt_ids, params, timeout_s=llm.timeout):
        seen = len(result.logprobs or [])
        text = result.absorb(out, began, time.perf_counter())
        yield text, (result.logprobs or [])[seen:], result


def _completion_requests(
    served: Served, request: CompletionRequest, limit: int | None
) -> list[AsyncIterator[Any]]:
    kwargs = request.call_kwargs()
    return [
        _raw_stream(served, ids, choice_kwargs(kwargs, k, request.n))
        for ids in _prompt_ids(served, request, limit)
        for k in range(request.n)
    ]


def _text_choice(
    index: int, text: str, entries: list[dict[str, Any]], wants_logprobs: bool, reason: str | None
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": completion_logprobs(entries) if wants_logprobs else None,
        "finish_reason": reason,
    }


async def completion(
    served: Served, request: CompletionRequest, limit: int | None
) -> dict[str, Any]:
    async def run(stream: AsyncIterator[Any]) -> GenerationResult:
        result = GenerationResult()
        async for _, _, result in stream:
            pass
        return result

    results = await gather_all([run(s) for s in _completion_requests(served, request, limit)])
    wants = request.logprobs is not None
    usage = sum(
        (Usage.of(r.prompt_tokens, len(r.token_ids), r.cached_tokens) for r in results), Usage()
    )
    return {
        "id": served.request_id,
        "object": "text_completion",
        "created": served.created,
        "model": served.model,
        "system_fingerprint": served.fingerprint,
        "choices": [
            _text_choice(i, r.text, r.logprobs or [], wants, finish_reason(r.finish_reason))
            for i, r in enumerate(results)
        ],
        "usage": usage.model_dump(),
    }


async def completion_events(
    served: Served, request: CompletionRequest, limit: int | None
) -> AsyncIterator[str]:
    streams = _completion_requests(served, request, limit)
    wants = request.logprobs is not None
    usage = Usage()

    def event(choice: dict[str, Any], usage: Usage | None = None) -> str:
        data: dict[str, Any] = {
            "id": served.request_id,
            "object": "text_completion",
            "created": served.created,
            "model": served.model,
            "system_fingerprint": served.fingerprint,
            "choices": [choice] if choice else [],
        }
        if usage is not None:
            data["usage"] = usage.model_dump()
        return sse(data)

    async for index, (text, entries, result) in merge(streams):
        done = result.finish_reason is not None
        if text or entries or done:
            yield event(
                _text_choice(
                    index,
                    text,
                    entries,
                    wants,
                    finish_reason(result.finish_reason) if done else None,
                )
            )
        if done:
            usage = usage + Usage.of(
                result.prompt_tokens, len(result.token_ids), result.cached_tokens
            )
    if request.stream_options is not None and request.stream_options.include_usage:
        yield event({}, usage)
    yield DONE
