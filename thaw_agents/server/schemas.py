"""Request and response shapes of ``thaw-agents serve``: OpenAI's, plus fork/snapshot/admin ones.

Requests are pydantic models that accept unknown fields (new OpenAI parameters must not break
old servers); the names a request sent that the server does not use are returned in the
``x-thaw-ignored-fields`` header. Values are checked once, by the code that uses them:
pydantic checks types here, ``ChatThaw`` / ``GenerationOptions`` check ranges (their
``ValueError`` names the field; ``param_of`` reads it back for the error body).

Every error is OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error with OpenAI's body; raised anywhere in a request, rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=type, param=param, code=code)
    ).model_dump()


# Names a ValueError from ChatThaw / GenerationOptions may start with or quote.
_PARAM_NAMES = (
    "max_completion_tokens",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop_token_ids",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "top_logprobs",
    "logprobs",
    "min_tokens",
    "ignore_eos",
    "tool_choice",
    "tools",
    "response_format",
    "json_schema",
    "json_object",
    "prompt",
    "messages",
)
_PARAM_RE = re.compile(r"\b(" + "|".join(_PARAM_NAMES) + r")\b")
_ALIASES = {"json_schema": "response_format", "json_object": "response_format"}


def param_of(message: str, *, prompt_field: str = "messages") -> str | None:
    """The request field a validation message is about (its first known name)."""
    match = _PARAM_RE.search(message)
    if match is None:
        return prompt_field if "prompt" in message else None
    name = match.group(1)
    if name == "prompt":
        return prompt_field
    return _ALIASES.get(name, name)


# ---------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def ignored_fields(self) -> list[str]:
        """Fields the client sent that this server does not know (and ignores)."""
        return sorted(self.model_extra or {})


class SamplingFields(_Request):
    """The sampling parameters shared by chat, completions and fork branches (vLLM's
    extensions top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """The set sampling fields as ChatThaw call kwargs (``stop`` always a list)."""
        out: dict[str, Any] = {}
        for name in SamplingFields.model_fields:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out


SAMPLING_NAMES = tuple(SamplingFields.model_fields)
BRANCH_OPTION_NAMES = (*SAMPLING_NAMES, "max_completion_tokens", "logprobs", "top_logprobs")
"""What a fork branch's ``options`` may set (never e.g. ``kv_transfer_params``)."""


class ChatMessage(_Request):
    """One OpenAI chat message (content as text or parts; assistant tool calls; tool results)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ToolFunction(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    """An OpenAI tool: ``{"type": "function", "function": {"name", "parameters", ...}}``."""

    type: Literal["function"] = "function"
    function: ToolFunction


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None

    def call_kwargs(self) -> dict[str, Any]:
        """ChatThaw call kwargs (validated there: a bad value raises ValueError naming it)."""
        out = self.sampling_kwargs()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        for name in ("logprobs", "top_logprobs", "tool_choice", "response_format"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.tools:
            out["tools"] = self.tool_dicts()
        return out

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as OpenAI dicts (what ChatThaw's ``tools`` kwarg takes)."""
        if not self.tools:
            return None
        return [
            {"type": "function", "function": t.function.model_dump(exclude_none=True)}
            for t in self.tools
        ]


class CompletionRequest(SamplingFields):
    """POST /v1/completions (a raw prompt: no chat template)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a parameter set to something this server cannot do."""
        if self.echo:
            return "echo", "echo=true is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of other than n is not supported"
        return None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return list(prompt)  # type: ignore[arg-type]

    def call_kwargs(self) -> dict[str, Any]:
        out = self.sampling_kwargs()
        if self.logprobs is not None:
            out["logprobs"] = int(self.logprobs)  # vLLM's count of top log-probabilities
        return out


Suffix = str | ChatMessage | list[ChatMessage]


class ForkRequest(_Request):
    """POST /v1/fork: compute a prefix once, run every suffix (n samples each) from it."""

    model: str
    messages: list[ChatMessage] | None = None
    """The shared prefix (may be empty when ``snapshot`` or a snapshot-named model gives it)."""
    snapshot: str | None = None
    """A registered snapshot (id or name) as the prefix; ``messages`` then extend it."""
    suffixes: list[Suffix] = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    options: dict[str, Any] | list[dict[str, Any]] | None = None
    """Generation options for every branch (a dict) or per suffix (a list of dicts)."""
    stream: bool = False
    timeout_s: float | None = Field(default=None, gt=0)


class SnapshotCreateRequest(_Request):
    """POST /v1/snapshots: snapshot the KV cache of these messages."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    name: str | None = None


class SnapshotSaveRequest(_Request):
    """POST /v1/snapshots/{id}/save (admin): write the ``.thawkv`` to a file/dir/s3:// URL."""

    dest: str = Field(min_length=1)


class SnapshotLoadRequest(_Request):
    """POST /v1/snapshots/load (admin): validate a saved snapshot and publish it."""

    src: str = Field(min_length=1)
    model: str
    name: str | None = None


class ModelRegisterRequest(_Request):
    """POST /admin/models (admin): serve another model under ``name``."""

    name: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1)
    """A model folder, a hub id, "embedded" or "tiny"."""


class WeightsLoadRequest(_Request):
    """POST /admin/models/{name}/weights (admin): hot swap the weights (``ChatThaw.load_weights``)."""

    src: str = Field(min_length=1)


# ---------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    """OpenAI usage; ``cached_tokens`` = prompt tokens served from the prefix cache/snapshot."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )

    @classmethod
    def from_langchain(cls, usage: dict[str, Any] | None) -> Usage:
        usage = usage or {}
        details = usage.get("input_token_details") or {}
        return cls.of(
            int(usage.get("input_tokens", 0)),
            int(usage.get("output_tokens", 0)),
            int(details.get("cache_read", 0) or 0),
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage.of(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.prompt_tokens_details.cached_tokens + other.prompt_tokens_details.cached_tokens,
        )


class ModelCard(BaseModel):
    """One entry of GET /v1/models (a model, or a snapshot usable as a model)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thaw-agents"
    root: str
    kind: Literal["model", "snapshot"] = "model"
    weights_version: str = ""
    parent: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_s() -> int:
    return int(time.time())


def fingerprint(weights_version: str) -> str:
    """``system_fingerprint``: which weights served the response."""
    return f"thaw-weights-{weights_version}"


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    system_fingerprint: str,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (``choices`` empty for the closing usage chunk)."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": system_fingerprint,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat-style logprob entries -> the legacy completions ``logprobs`` object."""
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }
