"""The few CUDA driver calls the block-id stager makes per kv_gather / kv_scatter call.

Why not torch: one public call at 136 MB moves its pages in ~70 us on the H200, so every
microsecond of host work shows when calls come back to back. torch's ``copy_`` of a pinned row,
``torch.empty`` on the device and ``torch.cuda.Event`` record/query cost ~25 us together on that
host (benchmarks/results/kv_host_cost_nvidia-h200.json, "device_ids"); the same four driver calls
through ctypes cost ~1 us each.

Everything here works on torch's objects: the device's primary context (the one torch uses), raw
streams from ``torch.cuda.current_stream().cuda_stream``, device pointers from ``data_ptr()``.
Every call's status is checked; :func:`driver` returns None where libcuda cannot be loaded (no
NVIDIA driver), and id_staging then refuses its "driver" path with a clear error. Events live as
long as the process (one per id slot per device).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Callable

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600
CU_EVENT_DISABLE_TIMING = 0x2

_c_uint64 = ctypes.c_uint64
_c_void_p = ctypes.c_void_p


class CudaDriverError(RuntimeError):
    """A CUDA driver call returned an error status."""


class CudaDriver:
    """libcuda's memcpy, event and context calls with their signatures declared (never guessed)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        sig = {
            "cuCtxGetDevice": [ctypes.POINTER(ctypes.c_int)],
            "cuMemcpyHtoDAsync_v2": [_c_uint64, _c_void_p, ctypes.c_size_t, _c_void_p],
            "cuEventCreate": [ctypes.POINTER(_c_void_p), ctypes.c_uint],
            "cuEventRecord": [_c_void_p, _c_void_p],
            "cuEventQuery": [_c_void_p],
            "cuEventSynchronize": [_c_void_p],
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for name, argtypes in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self.memcpy_htod_async = lib.cuMemcpyHtoDAsync_v2
        self.event_record = lib.cuEventRecord
        self.event_query = lib.cuEventQuery

    def check(self, status: int, what: str) -> None:
        """Raise :class:`CudaDriverError` naming ``what`` and the driver's error name."""
        if status != CUDA_SUCCESS:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(status, ctypes.byref(name))
            label = name.value.decode() if name.value else "unknown"
            raise CudaDriverError(f"{what} failed: CUDA driver error {status} ({label})")

    def current_device(self) -> int | None:
        """The device of the calling thread's current context, or None when it has none."""
        dev = ctypes.c_int(-1)
        if self._lib.cuCtxGetDevice(ctypes.byref(dev)) != CUDA_SUCCESS:
            return None
        return dev.value

    def event_create(self) -> int:
        """A new event without timing (the cheapest kind to record and query)."""
        event = _c_void_p()
        self.check(
            self._lib.cuEventCreate(ctypes.byref(event), CU_EVENT_DISABLE_TIMING), "cuEventCreate"
        )
        return event.value

    def event_done(self, event: int) -> bool:
        """Whether everything before the event's last record has run (no wait)."""
        status = self.event_query(event)
        if status == CUDA_ERROR_NOT_READY:
            return False
        self.check(status, "cuEventQuery")
        return True

    def event_wait(self, event: int) -> None:
        """Block the calling thread until the event's last record has run."""
        self.check(self._lib.cuEventSynchronize(event), "cuEventSynchronize")


_DRIVER: list[CudaDriver | None] = []
_DRIVER_LOCK = threading.Lock()


def driver() -> CudaDriver | None:
    """The process's :class:`CudaDriver`, loaded once; None without libcuda.so.1."""
    if not _DRIVER:
        with _DRIVER_LOCK:
            if not _DRIVER:
                try:
                    _DRIVER.append(CudaDriver(ctypes.CDLL("libcuda.so.1")))
                except (OSError, AttributeError):
                    _DRIVER.append(None)
    return _DRIVER[0]


def _torch_raw_stream() -> Callable[[int], int]:
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's launcher uses
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


_RAW_STREAM: list[Callable[[int], int]] = []


def current_stream(device_index: int) -> int:
    """torch's current stream on the device as a raw CUstream (~0.3 us; the Stream object ~3 us)."""
    if not _RAW_STREAM:
        _RAW_STREAM.append(_torch_raw_stream())
    return _RAW_STREAM[0](device_index)
