"""Writing and opening ``.thaw`` files; the format itself is :mod:`.format`.

write_weights(path, named_tensors, namespace)   tensors (CPU or GPU) -> file, atomically:
    plan offsets -> header size fixed (CRCs are fixed-width hex) -> space reserved
    (posix_fallocate: a full disk fails first) -> each tensor pwritten through the stream
    scheduler (GPU: CRC on the device, D2H through pinned double buffers, chunk k's DMA while
    chunk k - 1 is written) -> header last -> rename (``durable=True``: fsync first)

    Not durable by default: the file is complete and in the page cache when this returns, and
    a copy torn by a crash is refused at open or restore (header, sizes, every chunk's CRC).
    pwrite rather than stores into an mmap: on the H200 host a new file takes 4.0-4.2 GB/s by
    pwrite against 2.5-3.7 GB/s by mmap (results/host_paths_nvidia-h200.json).
open_weights(path)  -> WeightsFile: mmap (read-only), validated header, zero-copy tensors
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thaw_agents_core.transport.stream_scheduler import FileSpan, StreamScheduler, as_uint8_tensor
from thaw_agents_core.util.files import atomic_replace
from thaw_agents_core.weights.format import (
    DEFAULT_CRC_CHUNK_BYTES,
    WeightsChecksumError,
    WeightsHeader,
    WeightsNamespace,
    encode_header,
    parse_weights,
    plan_tensors,
    verify_payload,
)

PROGRESS_MIN_BYTES = 1 << 30
"""Show a tqdm bar for transfers of at least this many bytes (a moment on any machine)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The format's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a format dtype name (inverse of :func:`dtype_name`)."""
    return getattr(torch, name)


def progress(total_bytes: int, desc: str, enabled: bool | None = None) -> Any:
    """A tqdm bar in bytes, or a no-op when the transfer is small (or ``enabled`` is False)."""
    show = total_bytes >= PROGRESS_MIN_BYTES if enabled is None else enabled
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(slots=True)
class FreezeStats:
    """What a freeze wrote."""

    path: str
    num_tensors: int
    num_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The stats as a JSON-able dict (seconds rounded to microseconds)."""
        return {
            "path": self.path,
            "num_tensors": self.num_tensors,
            "num_bytes": self.num_bytes,
            "seconds": round(self.seconds, 6),
        }


def build_header(
    named: Sequence[tuple[str, torch.Tensor]],
    namespace: WeightsNamespace,
    crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES,
    extra: dict[str, Any] | None = None,
) -> WeightsHeader:
    """The header of a snapshot of ``named`` with placeholder CRCs (their final width)."""
    entries, payload = plan_tensors([(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in named])
    entries = [
        type(e)(e.name, e.dtype, e.shape, e.offset, (0,) * e.num_chunks(crc_chunk_bytes))
        for e in entries
    ]
    return WeightsHeader(
        namespace=namespace,
        tensors=entries,
        payload_bytes=payload,
        crc_chunk_bytes=crc_chunk_bytes,
        created_unix=time.time(),
        extra=dict(extra or {}),
    )


def fill_image(
    buf: Any,
    named: Sequence[tuple[str, torch.Tensor]],
    header: WeightsHeader,
    copier: StreamScheduler | None = None,
    show_progress: bool | None = None,
) -> None:
    """Write header + tensors into ``buf`` (at least image_bytes(header)) or, for a
    :class:`FileSpan` ``buf``, into its file; CRCs computed on the tensors' device while they
    are copied out."""
    head = encode_header(header)  # placeholder CRCs: same length as the final one
    to_file = isinstance(buf, FileSpan)
    image = None if to_file else as_uint8_tensor(buf)
    base = len(head)
    bar = progress(header.num_tensor_bytes, "freeze", show_progress)
    entries = []
    copiers: dict[str, StreamScheduler] = {}
    try:
        for (name, tensor), entry in zip(named, header.tensors):
            src = tensor.detach().contiguous().view(-1).view(torch.uint8)
            start = base + entry.offset
            dst = (
                FileSpan(buf.fd, buf.offset + start, entry.nbytes)
                if to_file
                else image[start : start + entry.nbytes]
            )
            if entry.nbytes == 0:
                crcs: list[int] = []
            else:
                sched = copier or copiers.setdefault(str(src.device), StreamScheduler(src.device))
                crcs = sched.to_host(src, dst, header.crc_chunk_bytes)
            entries.append(
                type(entry)(entry.name, entry.dtype, entry.shape, entry.offset, tuple(crcs))
            )
            bar.update(entry.nbytes)
    finally:
        bar.close()
        for sched in copiers.values():
            sched.close()
    header.tensors = entries
    final = encode_header(header)
    if len(final) != len(head):
        raise AssertionError("header length changed after the CRCs were filled in")
    if to_file:
        os.pwrite(buf.fd, final, buf.offset)
    else:
        image[: len(final)].copy_(torch.frombuffer(bytearray(final), dtype=torch.uint8))


def image_bytes(header: WeightsHeader) -> int:
    """Bytes of a whole ``.thaw`` image: header region + payload."""
    return len(encode_header(header)) + header.payload_bytes


def write_weights(
    path: str | os.PathLike[str],
    named: Iterable[tuple[str, torch.Tensor]],
    namespace: WeightsNamespace,
    *,
    crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES,
    extra: dict[str, Any] | None = None,
    copier: StreamScheduler | None = None,
    show_progress: bool | None = None,
    durable: bool = False,
) -> FreezeStats:
    """Write ``named`` tensors (CPU or one GPU) to ``path`` atomically; returns what it wrote.

    ``durable=True`` fsyncs the file and its folder before returning (disk speed, not page
    cache speed); see the module docstring for why the default need not.
    """
    began = time.perf_counter()
    named = list(named)
    header = build_header(named, namespace, crc_chunk_bytes, extra)
    total = image_bytes(header)
    with atomic_replace(path, durable=durable) as tmp:
        fd = os.open(tmp, os.O_RDWR)
        try:
            if total:
                os.posix_fallocate(fd, 0, total)
                fill_image(FileSpan(fd, 0, total), named, header, copier, show_progress)
        finally:
            os.close(fd)
    return FreezeStats(str(path), len(named), header.num_tensor_bytes, time.perf_counter() - began)


@dataclass
class WeightsFile:
    """A validated ``.thaw`` image over an mmap or buffer; ``tensor(name)`` views its payload."""

    header: WeightsHeader
    payload: memoryview
    path: str = ""
    owner: Any = field(default=None, repr=False)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy CPU tensor of one entry (read-only memory: never write to it)."""
        entry = self.header.by_name()[name]
        return self.tensor_of(entry)

    def tensor_of(self, entry: Any) -> torch.Tensor:
        """Zero-copy CPU tensor of a table entry (an empty tensor for zero bytes)."""
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        raw = as_uint8_tensor(self.payload[entry.offset : entry.offset + entry.nbytes])
        return raw.view(torch_dtype(entry.dtype)).view(entry.shape)

    def raw(self, entry: Any) -> memoryview:
        """Zero-copy bytes of a table entry's data."""
        return self.payload[entry.offset : entry.offset + entry.nbytes]

    def verify(self) -> None:
        """CRC32C every chunk on the CPU (WeightsChecksumError naming each bad one)."""
        bad = verify_payload(self.header, self.payload)
        if bad:
            raise WeightsChecksumError(bad)

    def close(self) -> None:
        """Release the payload view and close its owner (mmap or buffer) unless tensors over it
        are still alive (then the GC unmaps it)."""
        self.payload.release()
        owner, self.owner = self.owner, None
        if owner is not None and hasattr(owner, "close"):
            try:
                owner.close()
            except BufferError:  # tensors over it still alive: the GC unmaps later
                pass

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(buf: Any, path: str = "", owner: Any = None) -> WeightsFile:
    """A validated view over an in-memory ``.thaw`` image (CRCs not checked yet)."""
    header, payload = parse_weights(buf)
    return WeightsFile(header, payload, path, owner)


def open_weights(path: str | os.PathLike[str]) -> WeightsFile:
    """mmap a ``.thaw`` file read-only and validate its header (CRCs are checked at restore)."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weight snapshot at {path!r}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            from thaw_agents_core.weights.format import WeightsFormatError

            raise WeightsFormatError(f"{path} is empty: not a .thaw weight snapshot")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return open_image(mm, path, mm)
    except BaseException:
        mm.close()
        raise
