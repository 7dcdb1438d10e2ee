"""Verified device copies of snapshots, made before the scheduler offers them.

On CUDA a snapshot's bytes must be known good before vLLM is told a request can load it (vLLM
0.26's recompute after a failed load is not exact there, see connector/verifier.py). Checking
them on the host costs a CRC pass over every byte before the load even starts. Instead, the
engine process copies the whole payload to device memory once, checks every chunk's CRC32C on
the device (the copy's own checksums, :meth:`StreamScheduler.to_device_pieces`), and keeps the
copy; the load that follows is a device-to-device scatter of bytes already verified::

    scheduler: verdict(ref) -> DevicePrefetcher.status(ref)   None: copying / checking
                                                              True: held, verified
                                                              False: a chunk's CRC differs
    worker:    KVTransport.load(ref, ...) -> DevicePrefetcher.take(ref) -> scatter (D2D)
    elsewhere: a copy verified by another path (device_share.open_share) -> adopt(held)

No thread: the first ``status`` queues the copies and their CRC kernels (asynchronous DMA from
host memory registered with CUDA) and returns; later calls (vLLM asks again every step) poll
the last chunk's event without blocking and, once it fired, read all CRCs in one small copy.
A background thread would compete for the GIL with vLLM's busy scheduler loop (~5 ms per
hand-over); polling from the scheduler itself costs nothing while the copy runs.

Copies are held up to a byte budget (least recently used first out) and only while the device
has room to spare. A snapshot in memory that is not registered with CUDA (a file store), or
one that does not fit, gets ``"host"``: the caller checks it another way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from thaw_agents_core.snapshot.chunks import check_chunk_crcs
from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import SnapshotRef, SnapshotStore
from thaw_agents_core.transport.stream_scheduler import CopyPiece, StreamScheduler

logger = logging.getLogger("thaw_agents.transport")

DEFAULT_BUDGET_BYTES = 4 << 30
"""Device memory held by verified copies at most (per engine process)."""
HEADROOM_BYTES = 2 << 30
"""Free device memory a new copy must leave untouched (vLLM's activations, CUDA graphs)."""

Status = Literal[True, False, None, "host"]
Key = tuple[str, str]


def free_device_bytes(device: torch.device) -> int:
    """Device memory free for a new allocation: the driver's free bytes plus what torch's
    caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass(slots=True)
class HeldSnapshot:
    """A snapshot's payload on the device, every chunk's CRC32C matched."""

    header: Any
    payload: torch.Tensor
    """uint8, the whole payload (``header.payload_bytes``) on the device."""
    seconds: float
    """From the first ``status`` call to the verdict."""


@dataclass(slots=True)
class _InFlight:
    view: Any
    header: Any
    payload: torch.Tensor
    pieces: list[CopyPiece]
    chunk_bytes: int
    began: float


class DevicePrefetcher:
    """Copies snapshots to the device and checks them there (see the module docstring).

    ``status`` and ``take`` are called from vLLM's engine-core thread (scheduler and worker
    share it with one GPU); a lock keeps the bookkeeping consistent should they not."""

    def __init__(
        self,
        device: torch.device,
        store: Callable[[], SnapshotStore],
        namespace: Callable[[], Namespace],
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        copier: StreamScheduler | None = None,
    ) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self._store = store
        self._namespace = namespace
        self._lock = threading.RLock()
        self._held: OrderedDict[Key, HeldSnapshot] = OrderedDict()
        self._flying: dict[Key, _InFlight] = {}
        self._status: dict[Key, Status] = {}
        self._reasons: dict[Key, str] = {}
        self._copier = copier or StreamScheduler(device)
        self._own_copier = copier is None
        self.counts = {"verified": 0, "bad": 0, "host": 0, "taken": 0, "evicted": 0, "adopted": 0}

    def namespace(self) -> Namespace:
        """The engine's namespace now (it changes with its weights)."""
        return self._namespace()

    @staticmethod
    def _key(ref: SnapshotRef) -> Key:
        return ref.namespace_key, ref.snapshot_id

    def status(self, ref: SnapshotRef) -> Status:
        """True once a verified copy is held, False when a chunk was bad (or the snapshot
        unreadable), None while it is being copied (the first call starts the copy), ``"host"``
        when it cannot be copied here (check it another way). Never blocks on the copy."""
        key = self._key(ref)
        with self._lock:
            if key in self._status:
                return self._status[key]
            flying = self._flying.get(key)
            if flying is None:
                return self._start(ref, key)
            if not flying.pieces[-1].ready():
                return None
            return self._finish(ref, key, flying)

    def reason(self, ref: SnapshotRef) -> str | None:
        """Why ``status`` is False (None otherwise)."""
        return self._reasons.get(self._key(ref))

    def take(self, ref: SnapshotRef) -> HeldSnapshot | None:
        """The verified copy of ``ref``, if held (it stays held for later loads)."""
        key = self._key(ref)
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                self.counts["taken"] += 1
            return held

    def adopt(self, held: HeldSnapshot) -> bool:
        """Hold a copy verified elsewhere (a device share opened by ``device_share.open_share``,
        whose every chunk was checked on this device): loads of its snapshot scatter it.
        False when its namespace is not this engine's or it does not fit."""
        header = held.header
        if header.namespace.key() != self._namespace().key():
            return False
        key = (header.namespace.key(), header.snapshot_id)
        with self._lock:
            if key in self._held:
                return True
            if held.payload.numel() != header.payload_bytes or not self._make_room(
                header.payload_bytes
            ):
                return False
            self._held[key] = held
            self._status[key] = True
            self.counts["adopted"] += 1
            return True

    def held_bytes(self) -> int:
        """Device bytes the verified copies take now."""
        with self._lock:
            return sum(h.payload.numel() for h in self._held.values())

    # ------------------------------------------------------------------ copy, then check

    def _start(self, ref: SnapshotRef, key: Key) -> Status:
        began = time.perf_counter()
        view = None
        try:
            view = self._store().open(ref, expect_namespace=self._namespace())
            header = view.header
            if self.device.type == "cuda" and not self._copier.is_registered(view.payload):
                return self._settle(key, "host", view)  # pageable: the host would stage it
            if not self._make_room(header.payload_bytes):
                return self._settle(key, "host", view)
            payload = torch.empty(header.payload_bytes, dtype=torch.uint8, device=self.device)
            chunk_bytes = header.blocks_per_chunk * header.block_bytes
            pieces = self._copier.to_device_pieces(view.payload, payload, chunk_bytes)
        except torch.cuda.OutOfMemoryError:
            return self._settle(key, "host", view)
        except (SnapshotError, LookupError, OSError, ValueError) as exc:
            self._reasons[key] = f"{type(exc).__name__}: {exc}"
            return self._settle(key, False, view)
        flying = _InFlight(view, header, payload, pieces, chunk_bytes, began)
        self._flying[key] = flying
        if pieces[-1].ready():  # the CPU copies synchronously
            return self._finish(ref, key, flying)
        return None

    def _finish(self, ref: SnapshotRef, key: Key, flying: _InFlight) -> Status:
        del self._flying[key]
        for piece in flying.pieces:  # chunks finish in order on one CRC stream; make sure
            piece.synchronize()
        crcs = torch.cat([p.crcs for p in flying.pieces]).tolist()  # one small copy
        try:
            check_chunk_crcs(flying.header, crcs)
        except SnapshotError as exc:
            self._reasons[key] = f"{type(exc).__name__}: {exc}"
            return self._settle(key, False, flying.view)
        held = HeldSnapshot(flying.header, flying.payload, time.perf_counter() - flying.began)
        self._held[key] = held
        logger.info(
            "thaw: snapshot %s verified on the device (%.1f MB in %.1f ms)",
            ref.snapshot_id,
            flying.header.payload_bytes / 1e6,
            held.seconds * 1e3,
        )
        return self._settle(key, True, flying.view)

    def _settle(self, key: Key, status: Status, view: Any) -> Status:
        if view is not None:
            view.close()
        self._status[key] = status
        counter = {True: "verified", False: "bad", "host": "host"}[status]  # type: ignore[index]
        self.counts[counter] += 1
        return status

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used copies until ``nbytes`` fits the budget and the device."""
        if nbytes > self.budget_bytes:
            return False
        while self._held and self.held_bytes() + nbytes > self.budget_bytes:
            self._evict_oldest()
        if self.device.type != "cuda":
            return True
        free = free_device_bytes(self.device)
        while self._held and free < nbytes + HEADROOM_BYTES:
            free += self._evict_oldest()
        return free >= nbytes + HEADROOM_BYTES

    def _evict_oldest(self) -> int:
        key, held = self._held.popitem(last=False)
        self._status.pop(key, None)  # asked again: copied again
        self.counts["evicted"] += 1
        return held.payload.numel()

    def forget(self) -> None:
        """Drop every copy and status (weights changed: old namespaces are never loaded)."""
        with self._lock:
            for flying in self._flying.values():
                for piece in flying.pieces:  # no DMA may target freed memory
                    piece.synchronize()
                flying.view.close()
            self._flying.clear()
            self._held.clear()
            self._status.clear()
            self._reasons.clear()

    def close(self) -> None:
        """Free the copies (and the copier this prefetcher made)."""
        self.forget()
        if self._own_copier:
            self._copier.close()
