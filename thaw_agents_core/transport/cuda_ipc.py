"""CUDA tensors shared with other processes as JSON: data only, never a pickle.

    export_tensor(t)   owner      -> {"dtype", "shape", "stride", "storage_offset",
                                      "device_uuid", "handle"}
    open_tensor(entry) any process on the host -> a tensor over the owner's device memory

The handle is what torch's own multiprocessing reductions send (``UntypedStorage._share_cuda_``:
device, IPC memory handle, storage size and offset, reference-counter handle and offset, event
handle, whether to sync), with the byte strings written as hex. ``parse_entry`` checks every
field's type and range before anything reaches CUDA, so a malformed entry is a ValueError
naming the field, never a crash. The owner keeps the tensor alive while others may open it.
A process that opens the handle of another GPU reads it over the GPUs' link (peer access).
Processes number devices by their own CUDA_VISIBLE_DEVICES: the device is found by its UUID
(the handle's index is the owner's numbering), so it must be visible to the opener too.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from thaw_agents_core.snapshot.framing import is_hex_bytes, is_int

MAX_HANDLE_HEX = 1024  # a cudaIpcMemHandle_t is 64 bytes; torch's ref-counter name is short
ENTRY_FIELDS = ("dtype", "shape", "stride", "storage_offset", "device_uuid", "handle")


def _dtype(name: Any) -> Any:
    """The torch dtype named ``name`` ("bfloat16"), or None."""
    found = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    return found if isinstance(found, torch.dtype) else None


@dataclass(frozen=True, slots=True)
class CudaHandle:
    """A validated entry: where the tensor lies in the owner's storage, and the handle."""

    dtype: str
    device_uuid: str
    """The owning device's UUID ("" if unknown: the handle's index is used)."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    device: int
    memory_handle: bytes
    storage_bytes: int
    storage_byte_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)


@functools.cache
def device_uuid(index: int) -> str:
    """The UUID of this process's CUDA device ``index`` (asked once per device)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def export_tensor(t: torch.Tensor) -> dict[str, Any]:
    """The JSON entry of a CUDA tensor (see the module docstring)."""
    if not t.is_cuda:
        raise ValueError(f"only CUDA tensors have IPC handles, got one on {t.device}")
    handle = t.untyped_storage()._share_cuda_()
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "storage_offset": t.storage_offset(),
        "device_uuid": device_uuid(t.device.index),
        "handle": [h.hex() if isinstance(h, bytes) else h for h in handle],
    }


def _hex_bytes(value: Any, what: str) -> bytes:
    if not is_hex_bytes(value) or len(value) > MAX_HANDLE_HEX:
        raise ValueError(f"CUDA IPC entry: {what} must be lowercase hex of whole bytes")
    return bytes.fromhex(value)


def _nonneg(value: Any, what: str) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"CUDA IPC entry: {what} must be a non-negative int, got {value!r:.60}")
    return value


def parse_entry(obj: Any) -> CudaHandle:
    """Validate an entry from another process (types, ranges, the view inside its storage)."""
    if not isinstance(obj, dict) or set(obj) != set(ENTRY_FIELDS):
        raise ValueError(f"CUDA IPC entry must be an object with exactly {list(ENTRY_FIELDS)}")
    if _dtype(obj["dtype"]) is None:
        raise ValueError(f"CUDA IPC entry: dtype {obj['dtype']!r:.60} is not a torch dtype")
    shape, stride = obj["shape"], obj["stride"]
    for name, dims in (("shape", shape), ("stride", stride)):
        if not isinstance(dims, list) or len(dims) > 16:
            raise ValueError(f"CUDA IPC entry: {name} must be a list of at most 16 ints")
        if not all(type(d) is int and d >= 0 for d in dims):  # one pass: this runs per tensor
            bad = next(d for d in dims if type(d) is not int or d < 0)
            raise ValueError(f"CUDA IPC entry: {name} must be non-negative ints, got {bad!r:.60}")
    if len(shape) != len(stride):
        raise ValueError("CUDA IPC entry: shape and stride differ in length")
    handle = obj["handle"]
    if not isinstance(handle, list) or len(handle) != 8:
        raise ValueError("CUDA IPC entry: handle must be a list of 8 fields (torch's _share_cuda_)")
    device, memory, size, offset, ref, ref_offset, event, sync = handle
    if not isinstance(sync, bool):
        raise ValueError("CUDA IPC entry: handle[7] (event sync required) must be a bool")
    uuid = obj["device_uuid"]
    if not isinstance(uuid, str) or len(uuid) > 64 or not uuid.isprintable():
        raise ValueError("CUDA IPC entry: device_uuid must be a short string")
    entry = CudaHandle(
        dtype=obj["dtype"],
        device_uuid=uuid,
        shape=tuple(shape),
        stride=tuple(stride),
        storage_offset=_nonneg(obj["storage_offset"], "storage_offset"),
        device=_nonneg(device, "handle[0] (device)"),
        memory_handle=_hex_bytes(memory, "handle[1] (memory handle)"),
        storage_bytes=_nonneg(size, "handle[2] (storage bytes)"),
        storage_byte_offset=_nonneg(offset, "handle[3] (storage offset)"),
        ref_counter_handle=_hex_bytes(ref, "handle[4] (ref-counter handle)"),
        ref_counter_offset=_nonneg(ref_offset, "handle[5] (ref-counter offset)"),
        event_handle=_hex_bytes(event, "handle[6] (event handle)"),
        event_sync_required=sync,
    )
    item = _dtype(entry.dtype).itemsize
    if entry.numel:
        last = entry.storage_offset + sum((d - 1) * s for d, s in zip(entry.shape, entry.stride))
        if (last + 1) * item > entry.storage_bytes:
            raise ValueError(
                f"CUDA IPC entry: the view ends at byte {(last + 1) * item}, past its storage of "
                f"{entry.storage_bytes} bytes"
            )
    return entry


def local_device(entry: CudaHandle) -> int:
    """This process's index of the device holding the memory (by UUID, else the owner's
    index); ValueError when this process does not see that device."""
    count = torch.cuda.device_count()
    if entry.device_uuid:
        for i in range(count):
            if device_uuid(i) == entry.device_uuid:
                return i
        raise ValueError(
            f"the memory lies on device {entry.device_uuid}, which this process does not see "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    if entry.device >= count:
        raise ValueError(f"CUDA IPC entry names device {entry.device}; this process sees {count}")
    return entry.device


def open_tensor(entry: CudaHandle | dict[str, Any]) -> torch.Tensor:
    """A tensor over the owner's device memory (valid while the owner keeps it alive)."""
    e = entry if isinstance(entry, CudaHandle) else parse_entry(entry)
    device = local_device(e)
    storage = torch.UntypedStorage._new_shared_cuda(
        device,
        e.memory_handle,
        e.storage_bytes,
        e.storage_byte_offset,
        e.ref_counter_handle,
        e.ref_counter_offset,
        e.event_handle,
        e.event_sync_required,
    )
    t = torch.empty(0, dtype=_dtype(e.dtype), device=f"cuda:{device}")
    t.set_(storage, e.storage_offset, e.shape, e.stride)
    return t
