"""What every demo shares: a quiet environment, where it ran, and its JSON receipt.

Receipts go through ``benchmarks/_common.py`` (atomic write, machine and versions), to
``benchmarks/results/<demo>_<cpu|gpu-slug>.json`` unless the demo is given ``--receipt PATH``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def quiet_environment() -> None:
    """Keep vLLM, torch, transformers and progress bars quiet; call before the first engine
    starts (the engine processes inherit the environment). An explicit setting wins."""
    for name, value in (
        ("VLLM_LOGGING_LEVEL", "ERROR"),
        ("TORCH_CPP_LOG_LEVEL", "ERROR"),
        ("TQDM_DISABLE", "1"),
        ("PYTHONWARNINGS", "ignore"),
        ("TRANSFORMERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(name, value)
    import warnings

    warnings.simplefilter("ignore")


def _common() -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import _common

    return _common


def where_it_ran() -> str:
    """A short label of the machine: the GPU's name, or "CPU (N cores, model)"."""
    common = _common()
    gpu = common.gpu_name()
    if gpu:
        return gpu
    info = common.machine_info()
    return f"CPU ({info['cpu_cores_usable']} cores, {info['cpu_model']})"


def write_receipt(path: Path | None, name: str, payload: dict[str, Any]) -> Path:
    """Write the demo's JSON receipt (``where``, machine, load average + ``payload``)."""
    common = _common()
    payload = {
        "benchmark": name,
        "where": where_it_ran(),
        "machine": common.machine_info(),
        "load_average": common.load_average(),
        **payload,
    }
    return common.write_results(
        path or common.RESULTS / f"{name}_{common.device_slug()}.json", payload
    )
