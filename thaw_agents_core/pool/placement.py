"""Where ForkPool workers run.

On CPU, worker i is pinned to one core (cores round-robin, leaving the first core to the
parent's engine when there are more); on GPU, to device ``i % device_count`` (of the visible
ones) with a ``gpu_memory_fraction`` share of its memory. Each worker runs its engine
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the worker is already the separate process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.util import compat


@dataclass(slots=True)
class Placement:
    """Where one worker runs: its CPU cores or CUDA device, and engine arguments it overrides."""

    cpu_cores: list[int] | None = None
    cuda_device: int | None = None
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """Environment variables for the worker process: in-process engine, CPU binding and
        thread count, or the visible CUDA device."""
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if self.cpu_cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, self.cpu_cores))
            env["OMP_NUM_THREADS"] = str(len(self.cpu_cores))
        if self.cuda_device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.cuda_device)
        return env


def default_placements(num_workers: int, gpu_memory_fraction: float) -> list[Placement]:
    """One placement per worker (see the module docstring)."""
    if compat.is_cpu_platform():
        cores = sorted(os.sched_getaffinity(0))
        spare = cores[1:] if len(cores) > num_workers else cores  # core 0: the parent's engine
        return [Placement(cpu_cores=[spare[i % len(spare)]]) for i in range(num_workers)]
    import torch

    count = max(1, torch.cuda.device_count())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [int(d) for d in visible.split(",")] if visible else list(range(count))
    return [
        Placement(
            cuda_device=ids[i % len(ids)],
            engine_overrides={"gpu_memory_utilization": gpu_memory_fraction},
        )
        for i in range(num_workers)
    ]
