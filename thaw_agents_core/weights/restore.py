"""Restore: a validated ``.thaw`` image -> destination tensors, through the stream scheduler.

    for each tensor (payload order):  StreamScheduler.to_device_pieces(src bytes, dst bytes)
        registered host memory (a WeightsBuffer pinned once): every chunk's DMA queued at once
        pageable (a file's mmap, page cache): pinned double buffers, 8 fill threads
        CUDA: chunk CRC32C kernel on the destination, on its own stream
    then one sync: every chunk's CRC compared with the table -> WeightsChecksumError naming
    each bad (tensor, chunk). The caller runs this while the engine serves nothing (inside
    collective_rpc, between engine steps), so no request sees unverified weights.

CPU (vLLM-CPU): the same calls are memcpy plus the CPU CRC32C library.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from thaw_agents_core.transport.cuda_ipc import CudaHandle, open_tensor
from thaw_agents_core.transport.stream_scheduler import StreamScheduler
from thaw_agents_core.weights.format import (
    TensorEntry,
    WeightsChecksumError,
    WeightsMismatchError,
    check_tensor_crcs,
)
from thaw_agents_core.weights.io import WeightsFile, dtype_name, progress


@dataclass(slots=True)
class RestoreStats:
    """What a restore moved."""

    num_tensors: int
    num_bytes: int
    seconds: float
    path: str = ""
    weights_version: str = ""
    layout: str = "engine"

    def to_json(self) -> dict[str, Any]:
        """The stats as a JSON-able dict, with ``gb_per_s`` (None for zero seconds)."""
        return {
            "num_tensors": self.num_tensors,
            "num_bytes": self.num_bytes,
            "seconds": round(self.seconds, 6),
            "path": self.path,
            "weights_version": self.weights_version,
            "layout": self.layout,
            "gb_per_s": round(self.num_bytes / self.seconds / 1e9, 3) if self.seconds else None,
        }


def table_mismatches(entries: list[TensorEntry], targets: Mapping[str, torch.Tensor]) -> list[str]:
    """Every way the snapshot's table and the destination tensors disagree (empty: they fit)."""
    return spec_mismatches({e.name: (e.dtype, e.shape) for e in entries}, targets)


def spec_mismatches(
    specs: Mapping[str, tuple[str, tuple[int, ...]]], targets: Mapping[str, torch.Tensor]
) -> list[str]:
    """Every way ``name -> (dtype, shape)`` and the destination tensors disagree."""
    out = []
    for name, (dtype, shape) in specs.items():
        dst = targets.get(name)
        if dst is None:
            out.append(f"{name}: in the snapshot, not a parameter of this engine")
        elif dst.shape != shape or dtype_name(dst.dtype) != dtype:
            out.append(
                f"{name}: snapshot has {dtype}{list(shape)}, this engine has "
                f"{dtype_name(dst.dtype)}{list(dst.shape)}"
            )
        elif not dst.is_contiguous():
            out.append(f"{name}: the engine's tensor is not contiguous")
    out += [
        f"{n}: a parameter of this engine, missing from the snapshot"
        for n in targets
        if n not in specs
    ]
    return out


def restore_into(
    weights: WeightsFile,
    targets: Mapping[str, torch.Tensor],
    copier: StreamScheduler,
    *,
    show_progress: bool | None = None,
) -> RestoreStats:
    """Copy every tensor of ``weights`` into ``targets[name]`` and verify its chunk CRCs.

    The table is checked against ``targets`` before the first byte is written.
    """
    header = weights.header
    diff = table_mismatches(header.tensors, targets)
    if diff:
        raise WeightsMismatchError(diff)
    began = time.perf_counter()
    chunk = header.crc_chunk_bytes
    bar = progress(header.num_tensor_bytes, "restore", show_progress)
    pending: list[tuple[TensorEntry, list[Any]]] = []
    try:
        for entry in header.tensors:
            if entry.nbytes == 0:
                continue
            dst = targets[entry.name].view(-1).view(torch.uint8)
            pieces = copier.to_device_pieces(weights.raw(entry), dst, chunk)
            pending.append((entry, pieces))
            bar.update(entry.nbytes)
    finally:
        bar.close()
    bad = _check(pending, copier)
    if bad:
        raise WeightsChecksumError(bad)
    return RestoreStats(
        len(header.tensors),
        header.num_tensor_bytes,
        time.perf_counter() - began,
        weights.path,
        header.namespace.weights_version,
        "engine",
    )


def _check(
    pending: list[tuple[TensorEntry, list[Any]]], copier: StreamScheduler
) -> list[tuple[str, int]]:
    """One host sync for all CRCs (CUDA: a cat of the device CRC tensors, then .tolist())."""
    if not pending:
        return []
    if copier.is_cuda:
        for _, pieces in pending:
            pieces[-1].synchronize()
    flat = torch.cat([p.crcs for _, pieces in pending for p in pieces]).tolist()
    bad: list[tuple[str, int]] = []
    i = 0
    for entry, pieces in pending:
        n = sum(p.crcs.numel() for p in pieces)
        bad += check_tensor_crcs(entry, flat[i : i + n])
        i += n
    return bad


def state_dict_mismatches(
    sources: Mapping[str, torch.Tensor | CudaHandle], targets: Mapping[str, torch.Tensor]
) -> list[str]:
    """How a state dict (tensors, or CUDA IPC handles not opened yet) and ``targets`` differ."""
    specs = {
        n: (t.dtype, t.shape) if isinstance(t, CudaHandle) else (dtype_name(t.dtype), t.shape)
        for n, t in sources.items()
    }
    return spec_mismatches(specs, targets)


def copy_tensors(
    sources: Mapping[str, torch.Tensor | CudaHandle],
    targets: Mapping[str, torch.Tensor],
    *,
    keep: list[torch.Tensor] | None = None,
    checked: bool = False,
) -> RestoreStats:
    """Device-to-device (same GPU, e.g. CUDA IPC from a trainer) or host copies, no CRC: the
    bytes never left memory this host trusts. The table is checked before anything is opened
    or written (``checked``: the caller just ran :func:`state_dict_mismatches` on these very
    targets). A CUDA IPC storage is opened right before its first copy is queued, so the opens (tens
    of microseconds each) overlap the copies already in flight. ``keep`` receives the opened
    tensors (the caller holds them open)."""
    if not checked:
        diff = state_dict_mismatches(sources, targets)
        if diff:
            raise WeightsMismatchError(diff)
    began = time.perf_counter()
    total = 0
    opened = [] if keep is None else keep  # alive until the copies are done
    storages: dict[Any, Any] = {}  # one open per storage
    for name, src in sources.items():
        tensor = open_tensor(src, storages) if isinstance(src, CudaHandle) else src
        targets[name].copy_(tensor, non_blocking=True)
        opened.append(tensor)
        total += tensor.numel() * tensor.element_size()
    if any(t.is_cuda for t in targets.values()):
        torch.cuda.synchronize()
    return RestoreStats(len(sources), total, time.perf_counter() - began, layout="engine")
