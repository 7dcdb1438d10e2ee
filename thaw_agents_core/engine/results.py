"""One generation's outcome, the same type wherever it ran: the parent engine, a pool worker
(sent over the wire as JSON), and up to the LangChain face (which subclasses it).

    worker: vLLM RequestOutputs --GenerationResult.absorb--> to_wire() --JSON--> pool
    pool:   GenerationResult.from_wire(frame, engine="worker-<i>", retries=...)
    parent: GenerationResult.absorb(RequestOutput) per streamed output
    fork:   index / suffix_index / sample_index set by run_branches
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def logprob_entries(completion: Any) -> list[dict[str, Any]]:
    """OpenAI-style ``logprobs.content`` entries for the new tokens of one vLLM
    ``CompletionOutput`` (empty when it carries no log-probabilities)."""
    entries = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs or []):
        chosen = candidates.get(token_id)
        top = sorted(candidates.items(), key=lambda kv: kv[1].rank or 0)
        entries.append(
            {
                "token": chosen.decoded_token if chosen else str(token_id),
                "token_id": token_id,
                "logprob": chosen.logprob if chosen else None,
                "top_logprobs": [
                    {"token": lp.decoded_token, "token_id": tid, "logprob": lp.logprob}
                    for tid, lp in top
                    if tid != token_id or lp.rank is not None
                ],
            }
        )
    return entries


@dataclass
class GenerationResult:
    """Text, tokens, usage counts and timings of one request (a branch of a fork)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens this engine did not compute (its prefix cache or a loaded snapshot)."""
    ttft_s: float | None = None
    """Seconds from submitting the request to its first token."""
    total_s: float = 0.0
    logprobs: list[dict[str, Any]] | None = None
    """Per generated token (when asked for): see ``logprob_entries``."""
    engine: str = "parent"
    """Where it ran: "parent" or "worker-<i>"."""
    retries: int = 0
    """How often a pool re-sent it after its worker died."""
    error: str | None = None
    """Why it failed ("Type: message"); None when it succeeded."""
    route: dict[str, Any] = field(default_factory=dict)
    """Why it ran where it did: ``rule`` (the fork's routing rule that picked the engine) and
    ``load_decision`` (the engine's cost model: loaded the prefix snapshot or recomputed it,
    with both estimates), when they applied."""
    index: int = 0
    """Position among the branches of one fork."""
    suffix_index: int = 0
    sample_index: int = 0

    @property
    def ok(self) -> bool:
        """True when the request succeeded."""
        return self.error is None

    def absorb(self, out: Any, began: float, now: float) -> str:
        """Add one vLLM ``RequestOutput`` (a delta when streaming); returns its new text."""
        completion = out.outputs[0]
        if completion.token_ids and self.ttft_s is None:
            self.ttft_s = now - began
        self.text += completion.text
        self.token_ids.extend(completion.token_ids)
        if completion.logprobs:
            self.logprobs = [*(self.logprobs or []), *logprob_entries(completion)]
        if out.num_cached_tokens is not None:
            self.cached_tokens = int(out.num_cached_tokens)
        if completion.finish_reason is not None:
            self.finish_reason = completion.finish_reason
            params = (getattr(out, "kv_transfer_params", None) or {}).get("thaw") or {}
            if "load_decision" in params:
                self.route["load_decision"] = params["load_decision"]
        self.total_s = now - began
        return completion.text

    def to_wire(self) -> dict[str, Any]:
        """Plain JSON-ready data (the pool's "done" frame, LangGraph state)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any], **overrides: Any) -> GenerationResult:
        """Rebuild from ``to_wire`` data (unknown keys, like a frame's ``type``, ignored)."""
        names = {f.name for f in fields(GenerationResult)}
        values = {k: v for k, v in data.items() if k in names}
        values.update(overrides)
        return cls(**values)
