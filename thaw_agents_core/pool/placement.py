"""Where ForkPool workers run.

CPU: worker i is pinned to one core (cores round-robin, leaving the first core to the parent's
engine when there are more).

GPU, one visible device: every worker shares it with the parent, each with a
``gpu_memory_fraction`` share of its memory. Several visible devices: the parent keeps the
first, the workers go round-robin over the others, and the workers of one device split
``OWN_DEVICE_FRACTION`` of it. A worker sees its own device first (``cuda:0`` to its engine)
and the parent's second, so that it can read the parent's device memory directly (CUDA IPC,
peer copies: transport/device_share.py).

Each worker runs its engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the worker is
already the separate process.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.util import compat

OWN_DEVICE_FRACTION = 0.9
"""Memory share of a device that the parent does not use, split among its workers."""


@dataclass(slots=True)
class Placement:
    """Where one worker runs: its CPU cores or CUDA device, and engine arguments it overrides.

    ``peer_devices``: further devices the worker sees after its own (the parent's)."""

    cpu_cores: list[int] | None = None
    cuda_device: int | None = None
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    peer_devices: list[int] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        """Environment variables for the worker process: in-process engine, CPU binding and
        thread count, or the visible CUDA devices (its own first)."""
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if self.cpu_cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, self.cpu_cores))
            env["OMP_NUM_THREADS"] = str(len(self.cpu_cores))
        if self.cuda_device is not None:
            devices = [self.cuda_device, *(d for d in self.peer_devices if d != self.cuda_device)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        return env


def visible_cuda_devices() -> list[int]:
    """The CUDA device ids this process may use (CUDA_VISIBLE_DEVICES, else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [int(d) for d in visible.split(",") if d.strip()]
    import torch

    return list(range(max(1, torch.cuda.device_count())))


def gpu_placements(
    num_workers: int, gpu_memory_fraction: float, devices: list[int]
) -> list[Placement]:
    """Worker placements over ``devices`` (the parent's first; see the module docstring)."""
    if not devices:
        raise ValueError("no CUDA device to place workers on")
    parent, others = devices[0], devices[1:]
    if not others:  # one GPU: everyone shares it
        return [
            Placement(
                cuda_device=parent,
                engine_overrides={"gpu_memory_utilization": gpu_memory_fraction},
            )
            for _ in range(num_workers)
        ]
    chosen = [others[i % len(others)] for i in range(num_workers)]
    per_device = Counter(chosen)
    return [
        Placement(
            cuda_device=device,
            engine_overrides={
                "gpu_memory_utilization": round(OWN_DEVICE_FRACTION / per_device[device], 4)
            },
            peer_devices=[parent],
        )
        for device in chosen
    ]


def default_placements(num_workers: int, gpu_memory_fraction: float) -> list[Placement]:
    """One placement per worker (see the module docstring)."""
    if compat.is_cpu_platform():
        cores = sorted(os.sched_getaffinity(0))
        spare = cores[1:] if len(cores) > num_workers else cores  # core 0: the parent's engine
        return [Placement(cpu_cores=[spare[i % len(spare)]]) for i in range(num_workers)]
    return gpu_placements(num_workers, gpu_memory_fraction, visible_cuda_devices())
