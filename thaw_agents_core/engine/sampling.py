"""Per-request generation options -> vLLM ``SamplingParams``, with clear errors for bad values.

Every request builds its own ``SamplingParams``: concurrent callers never share one, so each keeps
its own temperature, seed, stop strings, ... even when vLLM batches them together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from thaw_agents_core.util import compat


@dataclass(slots=True)
class GenerationOptions:
    """The generation options thaw-agents understands (None = vLLM's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: int | None = None
    """Number of top log-probabilities per generated token (0 = only the chosen token's)."""
    logit_bias: dict[int, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    json_schema: dict[str, Any] | None = None
    """Constrain the output to this JSON schema (vLLM structured outputs)."""
    json_object: bool | None = None
    """Constrain the output to any JSON object."""
    kv_transfer_params: dict[str, Any] | None = None
    """Passed to the KV connector with the request (snapshot requests use it)."""

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in field order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> GenerationOptions:
        """Options from a dict (JSON: ``logit_bias`` keys may be strings); ValueError on an
        unknown name or a bad ``logit_bias`` (values are checked by ``validate``)."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"unknown generation parameter(s) {unknown}; valid: {', '.join(cls.names())}"
            )
        bias = values.get("logit_bias")
        if isinstance(bias, dict):  # from JSON (the pool wire) its token ids are strings
            try:
                values = {**values, "logit_bias": {int(t): float(b) for t, b in bias.items()}}
            except (TypeError, ValueError):
                raise ValueError(
                    f"logit_bias must map token ids (integers) to biases, got {bias!r}"
                ) from None
        return cls(**values)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate(options: GenerationOptions, *, max_model_len: int | None = None) -> None:
    """Raise ValueError naming the parameter, its value and the valid range."""
    o = options
    if o.max_tokens is not None:
        _check(
            isinstance(o.max_tokens, int) and o.max_tokens >= 1,
            f"max_tokens must be an integer >= 1, got {o.max_tokens!r}",
        )
        if max_model_len is not None:
            _check(
                o.max_tokens < max_model_len,
                f"max_tokens={o.max_tokens} does not fit the context of {max_model_len} tokens",
            )
    if o.temperature is not None:
        _check(0.0 <= o.temperature, f"temperature must be >= 0, got {o.temperature!r}")
    if o.top_p is not None:
        _check(0.0 < o.top_p <= 1.0, f"top_p must be in (0, 1], got {o.top_p!r}")
    if o.top_k is not None:
        _check(
            isinstance(o.top_k, int) and (o.top_k == -1 or o.top_k >= 0),
            f"top_k must be -1, 0 (disabled) or a positive integer, got {o.top_k!r}",
        )
    if o.min_p is not None:
        _check(0.0 <= o.min_p <= 1.0, f"min_p must be in [0, 1], got {o.min_p!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(o, name)
        if value is not None:
            _check(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value!r}")
    if o.repetition_penalty is not None:
        _check(
            o.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0, got {o.repetition_penalty!r}",
        )
    if o.logprobs is not None:
        _check(
            isinstance(o.logprobs, int) and 0 <= o.logprobs <= 20,
            f"logprobs (top log-probabilities per token) must be in [0, 20], got {o.logprobs!r}",
        )
    if o.stop is not None:
        _check(
            isinstance(o.stop, list) and all(isinstance(s, str) and s for s in o.stop),
            f"stop must be a list of non-empty strings, got {o.stop!r}",
        )
    if o.seed is not None:
        _check(isinstance(o.seed, int), f"seed must be an integer, got {o.seed!r}")
    _check(
        not (o.json_schema is not None and o.json_object),
        "json_schema and json_object are exclusive; pass one",
    )


def to_sampling_params(
    options: GenerationOptions, *, stream: bool, max_model_len: int | None = None
) -> Any:
    """Build vLLM ``SamplingParams`` (DELTA outputs when streaming, else FINAL_ONLY)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    validate(options, max_model_len=max_model_len)
    kwargs: dict[str, Any] = {}
    for name in (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logprobs",
        "logit_bias",
        "min_tokens",
        "ignore_eos",
    ):
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    # Whitespace inside constrained JSON is an engine-wide setting (see compat.py).
    if options.json_schema is not None:
        kwargs["structured_outputs"] = compat.structured_outputs_params(json=options.json_schema)
    elif options.json_object:
        kwargs["structured_outputs"] = compat.structured_outputs_params(json_object=True)
    if options.kv_transfer_params is not None:
        kwargs["extra_args"] = {"kv_transfer_params": options.kv_transfer_params}
    kwargs["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid generation parameters {kwargs}: {exc}") from exc
