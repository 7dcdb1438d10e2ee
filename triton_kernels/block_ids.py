"""Block ids for the KV gather/scatter: validated on the host (no device sync) and staged to the GPU.

The connector passes Python lists; they are checked with numpy (dtype, range, repeats for a
scatter) and copied to the device through reusable pinned slots, so a call neither pins memory
nor synchronises. Ids that already live on a device are checked there (one sync).
"""

from __future__ import annotations

import threading
from typing import Sequence, Union

import numpy as np
import torch
import triton

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
    them through :class:`_IdStager` instead, see :func:`device_ids`)."""
    arr = host_ids(block_ids, spec, unique)
    if arr is None:
        return device_tensor_ids(block_ids, spec, unique).to(device)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)


# Pinned slots for block ids, used round-robin. A slot is rewritten only once the copy that last
# read it has run (its event), so the host waits only when it is ID_SLOTS calls ahead of the GPU.
ID_SLOTS = 8


class _IdStager:
    """Host ids -> device ids through reusable pinned slots: no pin_memory() per call, no sync.

    All slots are one pinned [ID_SLOTS, capacity] tensor, allocated on first use and reallocated
    (twice the ids) when a call brings more ids than a slot holds. Dropping the old tensor is safe
    while copies from it are queued: torch's pinned allocator keeps a block until its copies ran.
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

    def to_device(self, ids: np.ndarray) -> torch.Tensor:
        """``ids`` on the device, copied asynchronously from the next pinned slot."""
        n = ids.shape[0]
        out = torch.empty(n, dtype=torch.int64, device=self.device)
        if n == 0:
            return out
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
        return out


_STAGERS: dict[torch.device, _IdStager] = {}


def device_ids(
    block_ids: BlockIds, spec: KVPageSpec, device: torch.device, unique: bool
) -> torch.Tensor:
    """Validated int64 block ids on ``device`` for the Triton path."""
    arr = host_ids(block_ids, spec, unique)
    if arr is None:
        return device_tensor_ids(block_ids, spec, unique).to(device)
    if device.type != "cuda":  # the interpreter (tests) runs on CPU tensors
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    stager = _STAGERS.get(device)
    if stager is None:
        stager = _STAGERS.setdefault(device, _IdStager(device))
    return stager.to_device(arr)
