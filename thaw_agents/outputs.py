"""vLLM ``RequestOutput``s -> LangChain messages: one pure converter for every path.

``invoke``/``ainvoke`` feed one final output; ``stream``/``astream`` feed deltas. Both go through
``CompletionAssembler`` so the sync and async paths cannot drift apart.

Streaming rules (what LangChain's aggregation expects):
- text deltas become ``AIMessageChunk(content=delta)``;
- the last chunk has ``chunk_position="last"`` and is the only one carrying ``usage_metadata``
  (input tokens counted once) and ``response_metadata.model_name``;
- tool calls arrive as ``tool_call_chunks`` on the last chunk (with forced tool choice the
  whole output is the call; with free tool use, text up to a ``<tool_call>`` is streamed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata

from thaw_agents import tool_calls as tc
from thaw_agents.messages import dumps_args
from thaw_agents_core.engine.results import logprob_entries

ToolMode = Literal["none", "auto", "forced"]
PROVIDER = "thaw"


def usage_metadata(input_tokens: int, output_tokens: int, cache_read: int) -> UsageMetadata:
    """LangChain usage: ``cache_read`` = prompt tokens served from the prefix cache/snapshot."""
    return UsageMetadata(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_token_details=InputTokenDetails(cache_read=cache_read),
    )


@dataclass
class CompletionAssembler:
    """Accumulates one request's outputs and turns them into chunks or a message."""

    model_name: str
    prompt_tokens: int
    tool_mode: ToolMode = "none"
    tool_names: list[str] = field(default_factory=list)
    routing: dict[str, Any] = field(default_factory=dict)
    """The auto-tool router's decision and token counts (see request_plan), if it ran."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    cached_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    _shown: int = 0

    def _absorb(self, out: Any) -> tuple[str, list[dict[str, Any]]]:
        completion = out.outputs[0]
        self.text += completion.text
        self.token_ids.extend(completion.token_ids)
        new_logprobs = logprob_entries(completion) if completion.logprobs else []
        self.logprobs.extend(new_logprobs)
        if out.num_cached_tokens is not None:
            self.cached_tokens = int(out.num_cached_tokens)
        if completion.finish_reason is not None:
            self.finish_reason = completion.finish_reason
            self.stop_reason = completion.stop_reason
        return completion.text, new_logprobs

    # ------------------------------------------------------------------ streaming

    def feed(self, out: Any) -> AIMessageChunk | None:
        """Absorb a DELTA output; return the chunk to stream now (None if nothing to show)."""
        _, new_logprobs = self._absorb(out)
        if self.tool_mode == "forced":
            return None
        limit = len(self.text) if self.tool_mode == "none" else tc.safe_text_prefix(self.text)
        if limit <= self._shown and not new_logprobs:
            return None
        delta = self.text[self._shown : limit]
        self._shown = max(self._shown, limit)
        metadata = {"logprobs": {"content": new_logprobs}} if new_logprobs else {}
        return AIMessageChunk(content=delta, response_metadata=metadata)

    def final_chunk(self) -> AIMessageChunk:
        """The closing chunk: rest of the text, tool calls, usage and metadata."""
        content, calls, invalid = self._split()
        shown = self.text[: self._shown]
        rest = content[len(shown) :] if content.startswith(shown) else ""
        chunks = [
            {
                "name": call["name"],
                "args": dumps_args(call["args"]),
                "id": call["id"],
                "index": i,
                "type": "tool_call_chunk",
            }
            for i, call in enumerate(calls)
        ]
        return AIMessageChunk(
            content=rest,
            tool_call_chunks=chunks,
            invalid_tool_calls=invalid,
            usage_metadata=self.usage(),
            response_metadata=self.metadata(bool(calls)),
            chunk_position="last",
        )

    # ------------------------------------------------------------------ whole message

    def message(self, out: Any | None = None) -> AIMessage:
        """Absorb a FINAL output (if given) and build the AIMessage."""
        if out is not None:
            self._absorb(out)
        content, calls, invalid = self._split()
        metadata = self.metadata(bool(calls))
        if self.logprobs:
            metadata["logprobs"] = {"content": self.logprobs}
        return AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=self.usage(),
            response_metadata=metadata,
        )

    # ------------------------------------------------------------------ pieces

    def _split(self) -> tuple[str, list, list]:
        if self.tool_mode == "forced":
            calls, invalid = tc.parse_forced(self.text)
            return "", calls, invalid
        if self.tool_mode == "auto":
            return tc.parse_text(self.text, self.tool_names)
        return self.text, [], []

    def usage(self) -> UsageMetadata:
        """Tokens of this request, plus the auto-tool router's request if one ran."""
        input_tokens = self.prompt_tokens + self.routing.get("routing_input_tokens", 0)
        output_tokens = len(self.token_ids) + self.routing.get("routing_output_tokens", 0)
        return usage_metadata(input_tokens, output_tokens, self.cached_tokens)

    def metadata(self, has_tool_calls: bool) -> dict[str, Any]:
        finish = "tool_calls" if has_tool_calls else self.finish_reason
        metadata: dict[str, Any] = {
            "model_name": self.model_name,
            "finish_reason": finish,
            "model_provider": PROVIDER,
        }
        if self.stop_reason is not None:
            metadata["stop_reason"] = self.stop_reason
        if self.routing:
            metadata["tool_routing"] = "tool" if self.routing["tool_routing"] else "text"
        return metadata
