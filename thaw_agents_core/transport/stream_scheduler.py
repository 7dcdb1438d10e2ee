"""Chunked host <-> device copies with each chunk's checksum overlapped with the next copy.

CUDA, host memory registered with CUDA (the shared-memory arena, pinned once per process)::

    copy stream   | H2D c0 | H2D c1 | H2D c2 | ...          one cudaMemcpyAsync per chunk
    crc stream             | CRC c0 | CRC c1 | CRC c2 |     waits on the chunk's event

CUDA, pageable host memory (a file's mmap): two pinned staging buffers in turn; a thread pool
fills one (multi-threaded memcpy out of the page cache) while the other is DMA'd::

    host threads  | fill s0 (c0) | fill s1 (c1) | fill s0 (c2) | ...
    copy stream                  | H2D s0->c0   | H2D s1->c1   | ...   (s0 reused after its event)
    crc stream                                  | CRC c0       | CRC c1 | ...

Device -> host is the mirror image (CRC on the device first, then D2H into pinned memory, chunk
k's DMA while chunk k - 1 is written out), into host memory or a :class:`FileSpan` (pwrite).
Reading a file goes through its mmap: on the H200 host 8 threads copy a page-cached mmap at 32
GB/s, as fast as 16 threads of preadv (results/host_paths_nvidia-h200.json).
CPU (vLLM-CPU): the same calls are plain memcpy plus the CPU CRC32C library.

Checksums are CRC32C of fixed ``crc_chunk_bytes`` pieces (a snapshot's chunks); copy chunks
are whole multiples of them so a checksum never straddles two copies.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from thaw_kernels import chunk_crc32c

DEFAULT_COPY_CHUNK_BYTES = 64 << 20
DEFAULT_STAGING_BYTES = 64 << 20
_FILL_THREADS = 8


def as_uint8_tensor(buffer: Any) -> torch.Tensor:
    """A zero-copy uint8 CPU tensor over a buffer (memoryview, mmap, bytearray, numpy)."""
    if isinstance(buffer, torch.Tensor):
        return buffer.view(torch.uint8).reshape(-1)
    view = memoryview(buffer).cast("B")
    if view.readonly:  # a read-only mmap: torch warns about non-writable memory; we never write
        import warnings

        import numpy as np

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.frombuffer(view, dtype=np.uint8))
    return torch.frombuffer(view, dtype=torch.uint8)


@dataclass(frozen=True, slots=True)
class FileSpan:
    """Bytes ``[offset, offset + nbytes)`` of a file open for writing: a destination of
    :meth:`StreamScheduler.to_host`, written with pwrite."""

    fd: int
    offset: int
    nbytes: int

    def numel(self) -> int:
        """Bytes in the span (the size check shared with tensor sources)."""
        return self.nbytes


class _PinnedRanges:
    """Host ranges registered with CUDA in this process, shared by every StreamScheduler
    (CUDA refuses to register a range twice), released when their last user lets go.

    A range must be unregistered before its memory is unmapped: DMA from a registered
    address range keeps using the pages pinned at registration.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[int, list[int]] = {}  # start -> [end, users]

    def covers(self, start: int, nbytes: int) -> bool:
        with self._lock:
            return any(
                lo <= start and start + nbytes <= end for lo, (end, _) in self._ranges.items()
            )

    def acquire(self, start: int, nbytes: int) -> float:
        """Register [start, start + nbytes) unless it already is; the seconds it took."""
        with self._lock:
            held = self._ranges.get(start)
            if held is not None and held[0] == start + nbytes:
                held[1] += 1
                return 0.0
            overlaps = [
                (lo, end)
                for lo, (end, _) in self._ranges.items()
                if lo < start + nbytes and start < end
            ]
            if overlaps:
                raise RuntimeError(
                    f"host range [{start:#x}, {start + nbytes:#x}) overlaps ranges "
                    f"already registered with CUDA: {overlaps}"
                )
            began = time.perf_counter()
            err = int(torch.cuda.cudart().cudaHostRegister(start, nbytes, 0))
            if err != 0:
                raise RuntimeError(
                    f"cudaHostRegister of {nbytes} bytes at {start:#x} failed: CUDA error {err}"
                )
            self._ranges[start] = [start + nbytes, 1]
            return time.perf_counter() - began

    def release(self, start: int) -> None:
        with self._lock:
            held = self._ranges.get(start)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del self._ranges[start]
                torch.cuda.cudart().cudaHostUnregister(start)


_PINNED = _PinnedRanges()


@dataclass(slots=True)
class CopyPiece:
    """One chunk of a host -> device copy: bytes [lo, hi) of the destination."""

    lo: int
    hi: int
    crcs: torch.Tensor
    """CRC32C of each crc chunk in [lo, hi) (int64; on the device on CUDA)."""
    done: Any
    """CUDA event recorded once the bytes are copied and ``crcs`` computed (None on CPU)."""

    def ready(self) -> bool:
        """Whether this chunk is copied and checksummed (never blocks)."""
        return self.done is None or bool(self.done.query())

    def synchronize(self) -> None:
        """Block until this chunk is copied and checksummed."""
        if self.done is not None:
            self.done.synchronize()

    def wait(self) -> list[int]:
        """Block until this chunk is done; its CRCs."""
        self.synchronize()
        return self.crcs.tolist()


@dataclass
class StreamScheduler:
    """Copies between host buffers and device tensors, returning chunk CRC32Cs (int64 tensor)."""

    device: torch.device
    copy_chunk_bytes: int = DEFAULT_COPY_CHUNK_BYTES
    staging_bytes: int = DEFAULT_STAGING_BYTES
    _registered: list[int] = field(default_factory=list, init=False)  # starts it acquired
    _staging: list[torch.Tensor] = field(default_factory=list, init=False)
    _staging_free: list[Any] = field(default_factory=lambda: [None, None], init=False)
    """Event of the last DMA out of each staging buffer: kept across calls, so back-to-back
    calls (one per weight tensor) never refill a buffer whose copy is still in flight."""
    _staging_turn: int = field(default=0, init=False)
    _streams: tuple[Any, Any] | None = field(default=None, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def is_cuda(self) -> bool:
        """True when the device is a CUDA GPU (else the CPU copy path)."""
        return self.device.type == "cuda"

    # ------------------------------------------------------------------ pinned host memory

    def register_host(self, buffer: Any) -> float:
        """Pin a long-lived host segment once (cudaHostRegister); returns the seconds it took.

        Registration costs ~0.74 s per GiB on the H100 host, so it is done once per process
        for the shared-memory arena, never per snapshot (schedulers share registrations).
        Call :meth:`close` before the segment is unmapped. No-op on CPU.
        """
        if not self.is_cuda:
            return 0.0
        tensor = as_uint8_tensor(buffer)
        seconds = _PINNED.acquire(tensor.data_ptr(), tensor.numel())
        self._registered.append(tensor.data_ptr())
        return seconds

    def unregister_all(self) -> None:
        """Release every host segment this scheduler pinned with register_host."""
        for start in self._registered:
            _PINNED.release(start)
        self._registered.clear()

    def is_registered(self, buffer: Any) -> bool:
        """Whether host ``buffer`` lies in memory registered with CUDA (its copies are queued
        at once, no host staging); False on CPU."""
        host = as_uint8_tensor(buffer)
        return self.is_cuda and self._is_registered(host.data_ptr(), host.numel())

    def _is_registered(self, start: int, nbytes: int) -> bool:
        return _PINNED.covers(start, nbytes)

    def _ensure_streams(self) -> tuple[Any, Any]:
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    def _ensure_staging(self) -> list[torch.Tensor]:
        if not self._staging:
            self._staging = [
                torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=True)
                for _ in range(2)
            ]
            self._pool = ThreadPoolExecutor(_FILL_THREADS, thread_name_prefix="thaw-fill")
        return self._staging

    def warm_up(self) -> float:
        """Pay the first-use costs of the copy path now (streams, pinned staging, fill
        threads); returns the seconds it took. A fresh engine's loader calls this so its log
        tells them apart from the copy. The CRC kernel is not launched here: Triton compiles
        a variant per argument specialisation, so a probe would compile one no copy uses.
        No-op on CPU."""
        if not self.is_cuda:
            return 0.0
        began = time.perf_counter()
        with self._lock:
            self._ensure_streams()
            self._ensure_staging()
            assert self._pool is not None
            _split(self._pool, _FILL_THREADS << 20, lambda a, b: None)  # threads started
        return time.perf_counter() - began

    # ------------------------------------------------------------------ host -> device

    def to_device(self, src: Any, dst: torch.Tensor, crc_chunk_bytes: int) -> torch.Tensor:
        """Copy host ``src`` into uint8 tensor ``dst`` (same size); CRC32C per crc chunk.

        On CUDA the returned CRCs are a device tensor and the work is queued on the current
        stream's timeline (callers read the CRCs, which synchronises).
        """
        pieces = self.to_device_pieces(src, dst, crc_chunk_bytes)
        if self.is_cuda:
            copy_stream, crc_stream = self._ensure_streams()
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(copy_stream)
            current.wait_stream(crc_stream)
        return torch.cat([piece.crcs for piece in pieces])

    def to_device_pieces(
        self, src: Any, dst: torch.Tensor, crc_chunk_bytes: int
    ) -> list[CopyPiece]:
        """Queue the copy of host ``src`` into ``dst`` chunk by chunk; return the chunks.

        A caller can use each chunk as soon as its ``done`` event has fired (its bytes and its
        CRCs are then final) while later chunks are still being copied. On CPU every chunk
        is done on return.
        """
        host = as_uint8_tensor(src)
        if host.numel() != dst.numel():
            raise ValueError(f"source has {host.numel()} bytes, destination {dst.numel()}")
        if not self.is_cuda:  # memcpy + CRC, piece by piece as on CUDA (all done on return)
            step = self._copy_chunk(crc_chunk_bytes, host.numel())
            pieces = []
            for lo in range(0, host.numel(), step):
                hi = min(lo + step, host.numel())
                dst[lo:hi].copy_(host[lo:hi])
                pieces.append(CopyPiece(lo, hi, chunk_crc32c(dst[lo:hi], crc_chunk_bytes), None))
            return pieces
        with self._lock:
            staged = not self._is_registered(host.data_ptr(), host.numel())
            return self._queue_to_device(host, dst, crc_chunk_bytes, staged)

    def _copy_chunk(self, crc_chunk_bytes: int, limit: int) -> int:
        step = max(crc_chunk_bytes, self.copy_chunk_bytes // crc_chunk_bytes * crc_chunk_bytes)
        return min(step, max(crc_chunk_bytes, limit // crc_chunk_bytes * crc_chunk_bytes))

    def _queue_to_device(
        self, host: torch.Tensor, dst: torch.Tensor, crc_chunk_bytes: int, staged: bool
    ) -> list[CopyPiece]:
        """Registered memory: every chunk's DMA is queued at once. Pageable (``staged``): the
        host fills staging buffer k % 2 (waiting for its previous DMA) before queuing chunk k."""
        copy_stream, crc_stream = self._ensure_streams()
        current = torch.cuda.current_stream(self.device)
        copy_stream.wait_stream(current)
        crc_stream.wait_stream(current)
        staging = self._ensure_staging() if staged else []
        step = self._copy_chunk(crc_chunk_bytes, self.staging_bytes if staged else host.numel())
        freed = self._staging_free  # staged: event when staging buffer k's DMA is done
        turn = 0
        pieces = []
        for lo in range(0, host.numel(), step):
            hi = min(lo + step, host.numel())
            if staged:
                assert self._pool is not None
                turn = self._staging_turn
                self._staging_turn ^= 1
                if freed[turn] is not None:
                    freed[turn].synchronize()
                source = staging[turn][: hi - lo]
                _parallel_copy(self._pool, source, host[lo:hi])
            else:
                source = host[lo:hi]
            with torch.cuda.stream(copy_stream):
                dst[lo:hi].copy_(source, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(copy_stream)
            if staged:
                freed[turn] = copied
            crc_stream.wait_event(copied)
            with torch.cuda.stream(crc_stream):
                crcs = chunk_crc32c(dst[lo:hi], crc_chunk_bytes)
                done = torch.cuda.Event()
                done.record(crc_stream)
            pieces.append(CopyPiece(lo, hi, crcs, done))
        return pieces

    # ------------------------------------------------------------------ device -> host

    def to_host(self, src: torch.Tensor, dst: Any, crc_chunk_bytes: int) -> list[int]:
        """Copy uint8 tensor ``src`` into host buffer or :class:`FileSpan` ``dst`` (pwrite);
        return the chunk CRC32Cs (computed on the device on CUDA).

        Pageable or file destinations go through the two staging buffers: chunk k's DMA runs
        while the host writes chunk k - 1 out.
        """
        host = dst if isinstance(dst, FileSpan) else as_uint8_tensor(dst)
        if host.numel() != src.numel():
            raise ValueError(f"source has {src.numel()} bytes, destination {host.numel()}")
        if not self.is_cuda:
            if isinstance(host, FileSpan):
                _spill(None, host, src, 0)
                return chunk_crc32c(src, crc_chunk_bytes).tolist()
            host.copy_(src)
            return chunk_crc32c(host, crc_chunk_bytes).tolist()
        with self._lock:
            copy_stream, crc_stream = self._ensure_streams()
            current = torch.cuda.current_stream(self.device)
            crc_stream.wait_stream(current)
            copy_stream.wait_stream(current)
            with torch.cuda.stream(crc_stream):
                crcs = chunk_crc32c(src, crc_chunk_bytes)
            if isinstance(host, torch.Tensor) and self._is_registered(
                host.data_ptr(), host.numel()
            ):
                with torch.cuda.stream(copy_stream):
                    host.copy_(src, non_blocking=True)
                copy_stream.synchronize()
            else:
                self._staged_to_host(src, host, crc_chunk_bytes)
            crc_stream.synchronize()
            return crcs.tolist()

    def _staged_to_host(
        self, src: torch.Tensor, host: torch.Tensor | FileSpan, crc_chunk_bytes: int
    ) -> None:
        staging = self._ensure_staging()
        assert self._pool is not None and self._streams is not None
        copy_stream = self._streams[0]
        step = self._copy_chunk(crc_chunk_bytes, self.staging_bytes)
        pending: tuple[torch.Tensor, int, Any] | None = None  # the chunk in flight
        for i, lo in enumerate(range(0, src.numel(), step)):
            hi = min(lo + step, src.numel())
            buf = staging[i % 2][: hi - lo]  # its last chunk was written out last turn
            with torch.cuda.stream(copy_stream):
                buf.copy_(src[lo:hi], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(copy_stream)
            if pending is not None:
                pending[2].synchronize()
                _spill(self._pool, host, pending[0], pending[1])
            pending = (buf, lo, copied)
        if pending is not None:
            pending[2].synchronize()
            _spill(self._pool, host, pending[0], pending[1])

    def close(self) -> None:
        """Unpin registered host memory, stop the host-copy threads, free the staging buffers."""
        self.unregister_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._staging.clear()


def _split(pool: ThreadPoolExecutor, n: int, task: Callable[[int, int], Any]) -> None:
    """``task(lo, hi)`` over ``[0, n)`` in pieces (>= 1 MiB, one per fill thread) on ``pool``;
    torch's copy_ and os.pwrite release the GIL."""
    piece = max(1 << 20, -(-n // _FILL_THREADS))
    futures = [pool.submit(task, lo, min(lo + piece, n)) for lo in range(0, n, piece)]
    for future in futures:
        future.result()


def _parallel_copy(pool: ThreadPoolExecutor, dst: torch.Tensor, src: torch.Tensor) -> None:
    """memcpy split across threads."""
    _split(pool, src.numel(), lambda a, b: dst[a:b].copy_(src[a:b]))


def _spill(
    pool: ThreadPoolExecutor | None, dst: torch.Tensor | FileSpan, src: torch.Tensor, lo: int
) -> None:
    """The destination's bytes from ``lo`` on <- CPU tensor ``src`` (threads with ``pool``;
    a host-memory destination is always staged, so it always has one)."""
    n = src.numel()
    if isinstance(dst, torch.Tensor):
        assert pool is not None
        _parallel_copy(pool, dst[lo : lo + n], src)
        return
    view = memoryview(src.contiguous().numpy())
    start = dst.offset + lo
    if pool is None:
        _pwrite_exact(dst.fd, view, start)
    else:
        _split(pool, n, lambda a, b: _pwrite_exact(dst.fd, view[a:b], start + a))


def _pwrite_exact(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` to ``fd`` at ``offset`` (pwrite releases the GIL)."""
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
