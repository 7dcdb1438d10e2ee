"""Block ids from the host to the GPU for one gather/scatter launch, without a sync per call.

Two host paths, chosen by ``HOST_PATH`` (environment ``THAW_KV_HOST_PATH``; settable in-process,
read at every call, so a benchmark can time both in one run):

``"torch"`` (default: every GPU run of this project so far used it)
    :class:`TorchIdStager`: ids -> a pinned slot -> ``torch.empty`` + ``copy_`` on the current
    stream, a ``torch.cuda.Event`` per slot; kv_blocks relaunches the compiled kernel with
    tensors. ~90 us of host work per public call at 136 MB on the H200 host
    (benchmarks/results/kv_host_cost_nvidia-h200.json), against a ~70 us kernel there.

``"driver"`` (written 2026-12-08 for issue 11; not yet run on a GPU: no machine was lent)
    :class:`DriverIdStager`: pinned *and* device slots, the copy and the slot events through
    CUDA driver calls (cuda_driver.py, ~1 us each instead of ~5-10 us per torch call); kv_blocks
    relaunches the compiled kernel with raw addresses and a raw stream. Expected ~40 us less
    host work per call. ``tests/unit/test_kv_blocks.py -m gpu`` runs the public path under both;
    ``benchmarks/kv_host_cost.py`` and ``benchmarks/kernels.py`` time both in one run. Make it the
    default once they have run on the GPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import NamedTuple

import numpy as np
import torch
import triton

from .cuda_driver import CudaDriver, current_stream, driver

HOST_PATHS = ("torch", "driver")
HOST_PATH = os.environ.get("THAW_KV_HOST_PATH", "torch")
"""The CUDA host path of kv_gather / kv_scatter: one of :data:`HOST_PATHS` (see the module doc)."""

ID_SLOTS = 8
"""Slots per device, used round-robin: the host waits only when it is this many calls ahead."""


def host_path() -> str:
    """The current :data:`HOST_PATH`, checked."""
    if HOST_PATH not in HOST_PATHS:
        raise ValueError(
            f"THAW_KV_HOST_PATH={HOST_PATH!r} is not a KV host path; use one of {HOST_PATHS}"
        )
    return HOST_PATH


class StagedIds(NamedTuple):
    """Block ids on the device for one launch; :meth:`release` right after queueing it."""

    tensor: torch.Tensor
    """int64 on the device; its first ``n`` elements are the ids (a slot's row may be longer)."""
    n: int
    stager: DriverIdStager | None
    slot: int

    def release(self) -> None:
        """Mark the slot reusable once the work queued so far on the current stream has run."""
        if self.stager is not None:
            self.stager.release(self.slot)


class TorchIdStager:
    """Host ids -> device ids through reusable pinned slots: no pin_memory() per call, no sync.

    All slots are one pinned [ID_SLOTS, capacity] tensor, allocated on first use and reallocated
    (twice the ids) when a call brings more ids than a slot holds. Dropping the old tensor is safe
    while copies from it are queued: torch's pinned allocator keeps a block until its copies ran.
    Each call gets a fresh device tensor (torch's caching allocator orders its reuse).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[torch.Tensor] = []
        self.rows_np: list[np.ndarray] = []
        self.events: list[torch.cuda.Event | None] = []
        self.next = 0
        self.lock = threading.Lock()

    def _grow(self, n: int) -> None:
        host = torch.empty(
            (ID_SLOTS, max(1024, triton.next_power_of_2(n))), dtype=torch.int64, pin_memory=True
        )
        self.rows = list(host.unbind(0))
        self.rows_np = list(host.numpy())
        self.events = [None] * ID_SLOTS

    def stage(self, ids: np.ndarray) -> StagedIds:
        """``ids`` on the device, copied asynchronously from the next pinned slot."""
        n = ids.shape[0]
        out = torch.empty(n, dtype=torch.int64, device=self.device)
        with self.lock:
            if not self.rows or self.rows[0].shape[0] < n:
                self._grow(n)
            i = self.next
            self.next = (i + 1) % ID_SLOTS
            event = self.events[i]
            if event is None:
                event = self.events[i] = torch.cuda.Event()
            elif not event.query():
                event.synchronize()  # the GPU is ID_SLOTS calls behind: wait for this slot only
            self.rows_np[i][:n] = ids
            out.copy_(self.rows[i][:n], non_blocking=True)
            event.record(torch.cuda.current_stream(self.device))
        return StagedIds(out, n, None, -1)


class DriverIdStager:
    """Host ids -> device ids through reusable slots: no allocation, no pinning, no sync per call.

    Lifecycle of slot i (all slots are rows of one pinned host tensor and one device tensor)::

        stage(ids)   take the next slot that is not mid-call; wait for its event only if the
                     GPU has not yet run the last kernel that read it; ids -> pinned row i;
                     queue pinned row i -> device row i on the current stream (driver memcpy)
        (caller)     queue the kernel that reads device row i on the same stream
        release(i)   record slot i's event on the current stream; the slot is free again

    Rows grow (twice the ids) when a call brings more ids than a row holds; the old rows are
    kept (``retired``) for the stager's life, since queued copies and kernels may still read them
    and torch's allocators do not know about the driver's copies: at most the size of the rows.
    A thread without this device's context current gets it for the driver calls
    (``torch.cuda.device``).
    """

    def __init__(self, device: torch.device, drv: CudaDriver) -> None:
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.drv = drv
        self.capacity = 0
        self.host_np: np.ndarray | None = None
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dev_rows: list[torch.Tensor] = []
        self.host_ptrs: list[int] = []
        self.dev_ptrs: list[int] = []
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.events: list[int] = []
        self.busy = [False] * ID_SLOTS
        self.next = 0
        self.lock = threading.Lock()

    def _grow(self, n: int) -> None:
        capacity = max(1024, triton.next_power_of_2(n))
        host = torch.empty((ID_SLOTS, capacity), dtype=torch.int64, pin_memory=True)
        dev = torch.empty((ID_SLOTS, capacity), dtype=torch.int64, device=self.device)
        if self.rows is not None:
            self.retired.append(self.rows)
        self.rows = (host, dev)
        self.host_np = host.numpy()
        self.dev_rows = list(dev.unbind(0))
        row_bytes = capacity * 8
        self.host_ptrs = [host.data_ptr() + i * row_bytes for i in range(ID_SLOTS)]
        self.dev_ptrs = [dev.data_ptr() + i * row_bytes for i in range(ID_SLOTS)]
        if not self.events:
            with self._current():
                self.events = [self.drv.event_create() for _ in range(ID_SLOTS)]
        self.capacity = capacity

    def _current(self):
        """This device's context current for driver calls (torch's primary context)."""
        if self.drv.current_device() == self.index:
            return contextlib.nullcontext()
        return torch.cuda.device(self.index)

    def stage(self, ids: np.ndarray) -> StagedIds:
        """Queue ``ids`` to a device row on the current stream; release the result after use."""
        n = ids.shape[0]
        with self.lock:
            if n > self.capacity:
                self._grow(n)
            i = self.next
            for _ in range(ID_SLOTS):
                if not self.busy[i]:
                    break
                i = (i + 1) % ID_SLOTS
            else:  # ID_SLOTS calls of other threads are between stage and release
                return StagedIds(torch.from_numpy(ids.copy()).to(self.device), n, None, -1)
            self.busy[i] = True
            self.next = (i + 1) % ID_SLOTS
            drv = self.drv
            with self._current():
                event = self.events[i]
                if not drv.event_done(event):
                    drv.event_wait(event)  # the GPU is ID_SLOTS calls behind: wait for this slot
                self.host_np[i, :n] = ids
                status = drv.memcpy_htod_async(
                    self.dev_ptrs[i], self.host_ptrs[i], n * 8, current_stream(self.index)
                )
            if status:
                self.busy[i] = False
                drv.check(status, "block ids host-to-device copy")
            return StagedIds(self.dev_rows[i], n, self, i)

    def release(self, i: int) -> None:
        """Record slot ``i``'s event behind the work queued on the current stream; free it."""
        with self._current():
            status = self.drv.event_record(self.events[i], current_stream(self.index))
        self.drv.check(status, "block ids slot event")  # on failure the slot stays taken
        self.busy[i] = False


_STAGERS: dict[tuple[torch.device, str], TorchIdStager | DriverIdStager] = {}
_STAGERS_LOCK = threading.Lock()


def stager_for(device: torch.device) -> TorchIdStager | DriverIdStager:
    """The stager of ``device`` for the current :data:`HOST_PATH` (made on first use)."""
    path = host_path()
    stager = _STAGERS.get((device, path))
    if stager is not None:
        return stager
    if path == "driver":
        drv = driver()
        if drv is None:
            raise RuntimeError(
                "THAW_KV_HOST_PATH=driver needs the CUDA driver library (libcuda.so.1), which "
                "could not be loaded; use THAW_KV_HOST_PATH=torch"
            )
        made: TorchIdStager | DriverIdStager = DriverIdStager(device, drv)
    else:
        made = TorchIdStager(device)
    with _STAGERS_LOCK:
        return _STAGERS.setdefault((device, path), made)
