"""Generation options, assembled in one place for invoke, stream and fork_fanout.

model fields (``ChatThaw.temperature``, ...)  = the defaults
  + per-call / per-branch values (LangChain kwargs, fork_fanout ``options``)
  -> ``build_options``: aliases resolved (``max_completion_tokens``, ``stop_sequences``),
     ``logprobs`` / ``top_logprobs`` -> vLLM's ``logprobs`` count, None dropped, every name
     and value checked (``GenerationOptions``), so bad input fails before the engine.
"""

from __future__ import annotations

from typing import Any

from thaw_agents_core.engine.sampling import GenerationOptions

OPTION_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
)
"""ChatThaw fields that are generation defaults (per-call values of the same name win)."""

_ALIASES = {"max_completion_tokens": "max_tokens", "stop_sequences": "stop"}


def build_options(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults + overrides as ``GenerationOptions`` fields (None values dropped), validated.

    Raises ValueError naming an unknown option or a bad value.
    """
    merged = dict(defaults)
    for name, value in overrides.items():
        merged[_ALIASES.get(name, name)] = value
    logprobs = merged.pop("logprobs", None)
    top_logprobs = merged.pop("top_logprobs", None)
    if isinstance(logprobs, bool) or logprobs is None:
        if logprobs or top_logprobs:
            merged["logprobs"] = int(top_logprobs or 0)
    else:  # already vLLM's count (e.g. from a structured-output helper)
        merged["logprobs"] = int(logprobs)
    options = {k: v for k, v in merged.items() if v is not None}
    GenerationOptions.from_mapping(options)
    return options
