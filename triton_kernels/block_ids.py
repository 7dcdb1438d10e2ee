"""Block ids for the KV gather/scatter: validated on the host (no device sync) and staged to the GPU.

The connector passes Python lists; they are checked with numpy (dtype, range, repeats for a
scatter) and copied to the device through reusable pinned and device slots with CUDA driver
calls (cuda_driver.py), so a call neither allocates, pins memory nor synchronises. Ids that
already live on a device are checked there (one sync).
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch
import triton

from .cuda_driver import CudaDriver, current_stream, driver
from .kv_pages import KVPageSpec

BlockIds = Union[Sequence[int], torch.Tensor]
"""Block ids as a Python sequence, a numpy array, or a CPU or device tensor."""


def bad_ids_dtype(block_ids: BlockIds, dtype, shape) -> ValueError:
    """The error for ids that are not a 1-D integer sequence (names the dtype torch would infer)."""
    if not isinstance(block_ids, torch.Tensor):
        try:  # name the dtype torch would have inferred, as the error always did
            dtype = torch.as_tensor(list(block_ids)).dtype
        except Exception:
            pass
    return ValueError(f"block_ids must be a 1-D integer sequence, got {dtype} shape {tuple(shape)}")


def check_id_values(lo: int, hi: int, n_distinct: int | None, n: int, spec: KVPageSpec) -> None:
    """Raise unless ids lie in 0..num_blocks-1 and, when ``n_distinct`` is given, none repeats."""
    if lo < 0 or hi >= spec.num_blocks:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"block id {bad} out of range: the cache has {spec.num_blocks} blocks "
            f"(0..{spec.num_blocks - 1})"
        )
    if n_distinct is not None and n_distinct != n:
        raise ValueError(
            "block_ids has repeats; a scatter would write one block twice in an undefined order"
        )


def host_ids(block_ids: BlockIds, spec: KVPageSpec, unique: bool) -> np.ndarray | None:
    """Validated int64 ids as a numpy array, checked on the host (no device sync).

    Takes a Python sequence, a numpy array or a CPU tensor; returns None for a device tensor
    (see :func:`device_tensor_ids`). ~5 us for 65 ids in a list.
    """
    if isinstance(block_ids, torch.Tensor):
        if block_ids.device.type != "cpu":
            return None
        if (
            block_ids.ndim != 1
            or block_ids.dtype.is_floating_point
            or block_ids.dtype.is_complex
            or block_ids.dtype == torch.bool
        ):
            raise bad_ids_dtype(block_ids, block_ids.dtype, block_ids.shape)
        arr = block_ids.detach().numpy()
    else:
        arr = np.asarray(
            block_ids if isinstance(block_ids, (list, tuple, np.ndarray)) else list(block_ids)
        )
        if arr.size == 0 and arr.ndim == 1:
            return np.empty(0, dtype=np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise bad_ids_dtype(block_ids, arr.dtype, arr.shape)
    n = arr.shape[0]
    if n:
        distinct = len(set(arr.tolist())) if unique else None
        check_id_values(int(arr.min()), int(arr.max()), distinct, n, spec)
    return arr.astype(np.int64, copy=False)


def device_tensor_ids(ids: torch.Tensor, spec: KVPageSpec, unique: bool) -> torch.Tensor:
    """Validate ids that already live on a device: one sync for min/max (pass a list to avoid it)."""
    if (
        ids.ndim != 1
        or ids.dtype.is_floating_point
        or ids.dtype.is_complex
        or ids.dtype == torch.bool
    ):
        raise bad_ids_dtype(ids, ids.dtype, ids.shape)
    if ids.numel():
        lo, hi = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())  # the sync
        distinct = torch.unique(ids).numel() if unique else None
        check_id_values(lo, hi, distinct, ids.numel(), spec)
    return ids.to(dtype=torch.int64).contiguous()


def block_id_tensor(
    block_ids: BlockIds, spec: KVPageSpec, device: torch.device, unique: bool
) -> torch.Tensor:
    """Validated int64 ids on ``device`` for the references and the CPU path (the Triton path stages
    them through :class:`_IdStager` instead, see :func:`stage_ids`)."""
    arr = host_ids(block_ids, spec, unique)
    if arr is None:
        return device_tensor_ids(block_ids, spec, unique).to(device)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)


# Slots for block ids, used round-robin: one pinned host row and one device row each. A slot is
# rewritten only once the kernel that last read it has run (its event, recorded after that launch),
# so the host waits only when it is ID_SLOTS calls ahead of the GPU.
ID_SLOTS = 8


class StagedIds(NamedTuple):
    """Block ids on the device for one launch; :meth:`release` right after queueing it."""

    tensor: torch.Tensor
    """int64 on the device; its first ``n`` elements are the ids (a slot's row may be longer)."""
    n: int
    stager: _IdStager | None
    slot: int

    def release(self) -> None:
        """Mark the slot reusable once the work queued so far on the current stream has run."""
        if self.stager is not None:
            self.stager.release(self.slot)


class _IdStager:
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
    Driver calls (cuda_driver.py) instead of torch's copy_/empty/Event: ~25 us less per call.
    """

    def __init__(self, device: torch.device, drv: CudaDriver) -> None:
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.drv = drv
        self.capacity = 0
        self.host_np: np.ndarray | None = None
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
        if self.host_np is not None:
            self.retired.append((self._host, self._dev))
        self._host, self._dev = host, dev
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
        with self._current():
            status = self.drv.event_record(self.events[i], current_stream(self.index))
        self.busy[i] = False
        self.drv.check(status, "block ids slot event")


_STAGERS: dict[torch.device, _IdStager] = {}
_STAGERS_LOCK = threading.Lock()


def stage_ids(
    block_ids: BlockIds, spec: KVPageSpec, device: torch.device, unique: bool
) -> StagedIds:
    """Validated int64 block ids on ``device`` for one Triton launch (release after queueing it).

    Host ids (lists, arrays, CPU tensors) are checked with numpy and staged through the device's
    :class:`_IdStager`; device tensors are checked on their device (one sync) and used as they are.
    """
    arr = host_ids(block_ids, spec, unique)
    if arr is None:
        ids = device_tensor_ids(block_ids, spec, unique).to(device)
        return StagedIds(ids, ids.shape[0], None, -1)
    if device.type != "cuda" or arr.shape[0] == 0:  # the interpreter (tests) runs on CPU tensors
        ids = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)
        return StagedIds(ids, arr.shape[0], None, -1)
    stager = _STAGERS.get(device)
    if stager is None:
        drv = driver()
        if drv is None:
            raise RuntimeError("CUDA tensors but no CUDA driver library (libcuda.so.1) to load")
        with _STAGERS_LOCK:
            stager = _STAGERS.setdefault(device, _IdStager(device, drv))
    return stager.stage(arr)
