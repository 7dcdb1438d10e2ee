"""CUDA tensors shared with other processes as JSON: data only, never a pickle.

    export_tensor(t)     owner -> {"dtype", "shape", "stride", "storage_offset",
                                   "device_uuid", "handle"}             one tensor, its storage
    export_storage(s, i) owner -> {"device_uuid", "handle"}               a storage, once
    export_view(t, i)    owner -> {"dtype", "shape", "stride", "storage_offset", "storage": i}
    parse_entry / parse_storage / parse_view    validated, nothing opened
    open_tensor(entry, opened)   any process on the host -> a tensor over the owner's memory

The handle is what torch's own multiprocessing reductions send (``UntypedStorage._share_cuda_``:
device, IPC memory handle, storage size and offset, reference-counter handle and offset, event
handle, whether to sync), with the byte strings written as hex. Many tensors that are views of
one storage (a trainer's flat parameter buffer) travel as one storage and many views: one
export, one open, one reference released. Parsing checks every field's type and range and each
view's extent inside its storage before anything reaches CUDA, so a malformed entry is a
ValueError naming the field, never a crash. The owner keeps the tensor alive while others may
open it. A process that opens the handle of another GPU reads it over the GPUs' link (peer
access). Processes number devices by their own CUDA_VISIBLE_DEVICES: the device is found by
its UUID (the handle's index is the owner's numbering), so it must be visible to the opener.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import torch

from thaw_agents_core.snapshot.framing import hex_bytes

MAX_HANDLE_HEX = 1024  # a cudaIpcMemHandle_t is 64 bytes; torch's ref-counter name is short
ENTRY_FIELDS = ("dtype", "shape", "stride", "storage_offset", "device_uuid", "handle")
_FIELDS = frozenset(ENTRY_FIELDS)


@functools.lru_cache(maxsize=64)  # names come from other processes: bounded
def _dtype_named(name: str) -> torch.dtype | None:
    found = getattr(torch, name, None) if name.isidentifier() else None
    return found if isinstance(found, torch.dtype) else None


def _dtype(name: Any) -> torch.dtype | None:
    """The torch dtype named ``name`` ("bfloat16"), or None."""
    return _dtype_named(name) if type(name) is str else None


class CudaStorage(NamedTuple):
    """A validated storage handle: the owner's device and its memory."""

    device_uuid: str
    """The owning device's UUID ("" if unknown: the handle's index is used)."""
    device: int
    memory_handle: bytes
    storage_bytes: int
    storage_byte_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class CudaHandle(NamedTuple):
    """A validated tensor: where it lies in its storage, and the storage."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage: CudaStorage

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)


@functools.cache
def device_uuid(index: int) -> str:
    """The UUID of this process's CUDA device ``index`` (asked once per device)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def export_storage(storage: torch.UntypedStorage, device_index: int) -> dict[str, Any]:
    """The JSON entry of a CUDA storage on this process's device ``device_index``."""
    handle = storage._share_cuda_()
    return {
        "device_uuid": device_uuid(device_index),
        "handle": [h.hex() if isinstance(h, bytes) else h for h in handle],
    }


def _view_fields(t: torch.Tensor) -> dict[str, Any]:
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "storage_offset": t.storage_offset(),
    }


def export_view(t: torch.Tensor, storage: int) -> dict[str, Any]:
    """The JSON entry of a CUDA tensor as a view of the ``storage``-th exported storage."""
    return {**_view_fields(t), "storage": storage}


def export_tensor(t: torch.Tensor) -> dict[str, Any]:
    """The JSON entry of one CUDA tensor with its storage (see the module docstring)."""
    if not t.is_cuda:
        raise ValueError(f"only CUDA tensors have IPC handles, got one on {t.device}")
    return {**_view_fields(t), **export_storage(t.untyped_storage(), t.device.index)}


def _hex_bytes(value: Any, what: str) -> bytes:
    raw = hex_bytes(value) if type(value) is str and len(value) <= MAX_HANDLE_HEX else None
    if raw is None:
        raise ValueError(f"CUDA IPC entry: {what} must be lowercase hex of whole bytes")
    return raw


def _nonneg(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:  # a bool is not an int here
        raise ValueError(f"CUDA IPC entry: {what} must be a non-negative int, got {value!r:.60}")
    return value


def _dims(dims: Any, name: str) -> tuple[int, ...]:
    if type(dims) is not list or len(dims) > 16:
        raise ValueError(f"CUDA IPC entry: {name} must be a list of at most 16 ints")
    for d in dims:
        if type(d) is not int or d < 0:
            raise ValueError(f"CUDA IPC entry: {name} must be non-negative ints, got {d!r:.60}")
    return tuple(dims)


_STORAGE_FIELDS = frozenset(("device_uuid", "handle"))
_VIEW_FIELDS = frozenset(("dtype", "shape", "stride", "storage_offset"))
_NAMED_VIEW_FIELDS = _VIEW_FIELDS | {"name", "storage"}


def _storage(obj: dict[str, Any]) -> CudaStorage:
    handle = obj["handle"]
    if type(handle) is not list or len(handle) != 8:
        raise ValueError("CUDA IPC entry: handle must be a list of 8 fields (torch's _share_cuda_)")
    device, memory, size, offset, ref, ref_offset, event, sync = handle
    if type(sync) is not bool:
        raise ValueError("CUDA IPC entry: handle[7] (event sync required) must be a bool")
    uuid = obj["device_uuid"]
    if type(uuid) is not str or len(uuid) > 64 or not uuid.isprintable():
        raise ValueError("CUDA IPC entry: device_uuid must be a short string")
    return CudaStorage(
        uuid,
        _nonneg(device, "handle[0] (device)"),
        _hex_bytes(memory, "handle[1] (memory handle)"),
        _nonneg(size, "handle[2] (storage bytes)"),
        _nonneg(offset, "handle[3] (storage offset)"),
        _hex_bytes(ref, "handle[4] (ref-counter handle)"),
        _nonneg(ref_offset, "handle[5] (ref-counter offset)"),
        _hex_bytes(event, "handle[6] (event handle)"),
        sync,
    )


def _view(obj: dict[str, Any], storage: CudaStorage) -> CudaHandle:
    dtype = _dtype(obj["dtype"])
    if dtype is None:
        raise ValueError(f"CUDA IPC entry: dtype {obj['dtype']!r:.60} is not a torch dtype")
    shape, stride = _dims(obj["shape"], "shape"), _dims(obj["stride"], "stride")
    if len(shape) != len(stride):
        raise ValueError("CUDA IPC entry: shape and stride differ in length")
    offset = _nonneg(obj["storage_offset"], "storage_offset")
    if 0 not in shape:
        end = (offset + sum((d - 1) * s for d, s in zip(shape, stride)) + 1) * dtype.itemsize
        if end > storage.storage_bytes:
            raise ValueError(
                f"CUDA IPC entry: the view ends at byte {end}, past its storage of "
                f"{storage.storage_bytes} bytes"
            )
    return CudaHandle(obj["dtype"], shape, stride, offset, storage)


def parse_storage(obj: Any) -> CudaStorage:
    """Validate a storage entry from another process (``export_storage``'s)."""
    if type(obj) is not dict or obj.keys() != _STORAGE_FIELDS:
        raise ValueError(
            f"CUDA IPC storage must be an object with exactly {sorted(_STORAGE_FIELDS)}"
        )
    return _storage(obj)


def parse_view(obj: Any, storages: list[CudaStorage]) -> CudaHandle:
    """Validate a named view entry (``export_view``'s, plus ``"name"``) of ``storages``."""
    if type(obj) is not dict or obj.keys() != _NAMED_VIEW_FIELDS:
        raise ValueError(
            f"CUDA IPC view must be an object with exactly {sorted(_NAMED_VIEW_FIELDS)}"
        )
    index = obj["storage"]
    if type(index) is not int or not 0 <= index < len(storages):
        raise ValueError(
            f"CUDA IPC view: storage must be an index below {len(storages)}, got {index!r:.60}"
        )
    return _view(obj, storages[index])


def parse_entry(obj: Any) -> CudaHandle:
    """Validate a one-tensor entry from another process (``export_tensor``'s)."""
    if type(obj) is not dict or obj.keys() != _FIELDS:
        raise ValueError(f"CUDA IPC entry must be an object with exactly {list(ENTRY_FIELDS)}")
    return _view(obj, _storage(obj))


def local_device(storage: CudaStorage) -> int:
    """This process's index of the device holding the memory (by UUID, else the owner's
    index); ValueError when this process does not see that device."""
    count = torch.cuda.device_count()
    if storage.device_uuid:
        for i in range(count):
            if device_uuid(i) == storage.device_uuid:
                return i
        raise ValueError(
            f"the memory lies on device {storage.device_uuid}, which this process does not see "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    if storage.device >= count:
        raise ValueError(f"CUDA IPC entry names device {storage.device}; this process sees {count}")
    return storage.device


def open_storage(s: CudaStorage) -> tuple[torch.UntypedStorage, int]:
    """The owner's storage in this process, and this process's index of its device."""
    device = local_device(s)
    storage = torch.UntypedStorage._new_shared_cuda(
        device,
        s.memory_handle,
        s.storage_bytes,
        s.storage_byte_offset,
        s.ref_counter_handle,
        s.ref_counter_offset,
        s.event_handle,
        s.event_sync_required,
    )
    return storage, device


def open_tensor(
    entry: CudaHandle | dict[str, Any],
    opened: dict[CudaStorage, tuple[torch.UntypedStorage, int]] | None = None,
) -> torch.Tensor:
    """A tensor over the owner's device memory (valid while the owner keeps it alive).
    ``opened``: storages already opened in this batch (one open per storage; filled here)."""
    e = entry if isinstance(entry, CudaHandle) else parse_entry(entry)
    found = None if opened is None else opened.get(e.storage)
    if found is None:
        found = open_storage(e.storage)
        if opened is not None:
            opened[e.storage] = found
    storage, device = found
    t = torch.empty(0, dtype=_dtype(e.dtype), device=f"cuda:{device}")
    t.set_(storage, e.storage_offset, e.shape, e.stride)
    return t
