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

Copies are held up to a byte budget (least recently used first out) and only while the device
has room to spare; a snapshot that does not fit is checked where it is copied, as before
(``status`` then returns ``"host"``: the caller falls back to the host check).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from thaw_agents_core.snapshot.format import Namespace, SnapshotError, check_chunk_crcs
from thaw_agents_core.store.base import SnapshotRef, SnapshotStore
from thaw_agents_core.transport.stream_scheduler import StreamScheduler

logger = logging.getLogger("thaw_agents.transport")

DEFAULT_BUDGET_BYTES = 4 << 30
"""Device memory held by verified copies at most (per engine process)."""
HEADROOM_BYTES = 2 << 30
"""Free device memory a new copy must leave untouched (vLLM's activations, CUDA graphs)."""

Status = Literal[True, False, None, "host"]


@dataclass(slots=True)
class HeldSnapshot:
    """A snapshot's payload on the device, every chunk's CRC32C matched."""

    header: Any
    payload: torch.Tensor
    """uint8, the whole payload (``header.payload_bytes``) on the device."""
    seconds: float
    """Copy and check time."""


class DevicePrefetcher:
    """Copies snapshots to the device and checks them there, in one background thread."""

    def __init__(
        self,
        device: torch.device,
        store: Callable[[], SnapshotStore],
        namespace: Callable[[], Namespace],
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self._store = store
        self._namespace = namespace
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[str, str], HeldSnapshot] = OrderedDict()
        self._status: dict[tuple[str, str], Status] = {}
        self._reasons: dict[tuple[str, str], str] = {}
        self._copier: StreamScheduler | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="thaw-prefetch")
        self.counts = {"verified": 0, "bad": 0, "host": 0, "taken": 0, "evicted": 0}

    @staticmethod
    def _key(ref: SnapshotRef) -> tuple[str, str]:
        return ref.namespace_key, ref.snapshot_id

    def status(self, ref: SnapshotRef) -> Status:
        """True once a verified copy is held, False when a chunk was bad (or the snapshot
        unreadable), None while it is being copied (the first call starts the copy), ``"host"``
        when it does not fit on the device (check it another way)."""
        key = self._key(ref)
        with self._lock:
            if key in self._status:
                return self._status[key]
            self._status[key] = None
        self._pool.submit(self._prefetch, ref)
        return None

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

    def held_bytes(self) -> int:
        """Device bytes the verified copies take now."""
        with self._lock:
            return sum(h.payload.numel() for h in self._held.values())

    # ------------------------------------------------------------------ the background copy

    def _prefetch(self, ref: SnapshotRef) -> None:
        key = self._key(ref)
        began = time.perf_counter()
        try:
            with self._store().open(ref, expect_namespace=self._namespace()) as view:
                header = view.header
                if not self._make_room(header.payload_bytes):
                    self._finish(key, "host", counter="host")
                    return
                payload = torch.empty(header.payload_bytes, dtype=torch.uint8, device=self.device)
                chunk_bytes = header.blocks_per_chunk * header.block_bytes
                for piece in self._copier_for().to_device_pieces(
                    view.payload, payload, chunk_bytes
                ):
                    check_chunk_crcs(header, piece.wait(), piece.lo // chunk_bytes)
            held = HeldSnapshot(header, payload, time.perf_counter() - began)
            with self._lock:
                self._held[key] = held
            self._finish(key, True, counter="verified")
            logger.info(
                "thaw: snapshot %s verified on the device (%.1f MB in %.1f ms)",
                ref.snapshot_id,
                header.payload_bytes / 1e6,
                held.seconds * 1e3,
            )
        except torch.cuda.OutOfMemoryError:
            self._finish(key, "host", counter="host")
        except (SnapshotError, LookupError, OSError, ValueError) as exc:
            self._reasons[key] = f"{type(exc).__name__}: {exc}"
            self._finish(key, False, counter="bad")
        except Exception as exc:  # noqa: BLE001 - unexpected: say so, let the caller check it
            logger.warning("thaw: device prefetch of %s failed: %r", ref.snapshot_id, exc)
            self._finish(key, "host", counter="host")

    def _finish(self, key: tuple[str, str], status: Status, *, counter: str) -> None:
        with self._lock:
            self._status[key] = status
            self.counts[counter] += 1

    def _copier_for(self) -> StreamScheduler:
        if self._copier is None:  # its own streams and staging: the worker's copier is busy
            self._copier = StreamScheduler(self.device)
        return self._copier

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used copies until ``nbytes`` fits the budget and the device."""
        if nbytes > self.budget_bytes:
            return False
        with self._lock:
            while self._held and self._held_bytes_locked() + nbytes > self.budget_bytes:
                self._evict_oldest_locked()
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        with self._lock:
            while self._held and free < nbytes + HEADROOM_BYTES:
                free += self._evict_oldest_locked()
        return free >= nbytes + HEADROOM_BYTES

    def _held_bytes_locked(self) -> int:
        return sum(h.payload.numel() for h in self._held.values())

    def _evict_oldest_locked(self) -> int:
        key, held = self._held.popitem(last=False)
        self._status.pop(key, None)  # asked again: copied again
        self.counts["evicted"] += 1
        return held.payload.numel()

    def forget(self) -> None:
        """Drop every copy and status (weights changed: old namespaces are never loaded)."""
        with self._lock:
            self._held.clear()
            self._status.clear()
            self._reasons.clear()

    def close(self) -> None:
        """Stop the background thread and free the copies."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.forget()
        if self._copier is not None:
            self._copier.close()
            self._copier = None
