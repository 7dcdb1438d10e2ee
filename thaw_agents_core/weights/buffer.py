"""WeightsBuffer: a ``.thaw`` image in shared memory, made once and rewritten every step.

The PCIe-rate hot-swap source. Lifecycle:

    trainer / parent process                      engine worker process (each rank, each pool worker)
    buf = WeightsBuffer.create(nbytes)            (nothing yet)
    buf.write(state_dict, weights_version)        first swap: attach(name) -> mmap, cudaHostRegister
    engine.load_weights(buf)  --descriptor-->     once (0.45 s/GiB on the H200), kept for the next swaps
    buf.write(...) next step; load_weights(buf)   registered: every chunk's DMA queued at once
    buf.close() (unlinks /dev/shm/NAME)           the attached mapping lives until the process exits

The creator unlinks; attachers only map (a name that vanished fails the next attach with a clear
error). Only the descriptor (name, size) crosses processes, never the bytes or a pickle.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from thaw_agents_core.weights.format import WeightsNamespace
from thaw_agents_core.weights.io import (
    WeightsFile,
    build_header,
    fill_image,
    image_bytes,
    open_image,
)

SHM_DIR = Path("/dev/shm")
_PREFIX = "thaw-weights-"


class WeightsBuffer:
    """A shared-memory ``.thaw`` image that engines in other processes attach by name."""

    def __init__(self, name: str, capacity: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.capacity = capacity
        self._mm = mm
        self._owner = owner

    @classmethod
    def create(cls, capacity: int, name: str | None = None) -> WeightsBuffer:
        """A new segment of ``capacity`` bytes (/dev/shm/NAME), owned (unlinked) by this object."""
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        name = name or f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, capacity)
            mm = mmap.mmap(fd, capacity)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls(name, capacity, mm, owner=True)

    @classmethod
    def for_tensors(cls, named: Mapping[str, torch.Tensor], *, slack: float = 0.0) -> WeightsBuffer:
        """A segment sized for ``named`` (plus ``slack`` as a fraction, for growing headers)."""
        ns = WeightsNamespace("", "", "", "checkpoint", 0, 1, "")
        need = image_bytes(build_header(list(named.items()), ns))
        return cls.create(int(need * (1 + slack)) + 4096)

    @classmethod
    def attach(cls, name: str) -> WeightsBuffer:
        """Map an existing segment read-write (CUDA registration needs a writable mapping)."""
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"weights buffer {name!r} does not exist (its creator closed it?)"
            ) from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    @property
    def buffer(self) -> mmap.mmap:
        """The segment's read-write memory map (the whole capacity)."""
        return self._mm

    def write(
        self,
        named: Mapping[str, torch.Tensor] | list[tuple[str, torch.Tensor]],
        weights_version: str,
        *,
        namespace: WeightsNamespace | None = None,
        layout: str = "checkpoint",
    ) -> None:
        """Put ``named`` tensors (CPU or GPU) into the buffer as a complete ``.thaw`` image."""
        items = list(named.items()) if isinstance(named, Mapping) else list(named)
        dtype = str(items[0][1].dtype).replace("torch.", "") if items else ""
        ns = namespace or WeightsNamespace("", "", dtype, layout, 0, 1, weights_version)
        header = build_header(items, ns)
        need = image_bytes(header)
        if need > self.capacity:
            raise ValueError(
                f"the weights need {need} bytes, the buffer holds {self.capacity}: "
                "create a larger WeightsBuffer"
            )
        fill_image(self._mm, items, header, show_progress=False)

    def open(self) -> WeightsFile:
        """The validated image currently in the buffer."""
        return open_image(self._mm, path=f"shm://{self.name}")

    def descriptor(self) -> dict[str, Any]:
        """What a worker needs to attach it (JSON)."""
        return {"kind": "shm", "name": self.name, "size": self.capacity}

    def close(self) -> None:
        """Unmap; the creator also unlinks the segment."""
        try:
            self._mm.close()
        except BufferError:
            pass
        if self._owner:
            (SHM_DIR / self.name).unlink(missing_ok=True)
            self._owner = False

    def __enter__(self) -> WeightsBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
