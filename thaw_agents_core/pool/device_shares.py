"""Device shares for a ForkPool on GPUs (opt-in: ``ForkPool(..., device_shares=True)``).

    parent process (the pool's loop)                       worker i (its own GPU, or a share)
      a request's prompt -> its longest snapshot in the parent's store
      first time: host -> the parent's GPU once, every
      chunk's CRC32C checked there (PoolShares)
      the descriptor (transport/device_share) rides  ----->  BranchEngine.add: adopt_share:
      with the request                                       one copy from the parent's GPU
                                                             (a peer copy over NVLink), its
                                                             CRCs checked on its own GPU, held
                                                             by its connector's prefetcher;
                                                             the load then scatters that copy

Anything that fails on the way (no room on the parent's GPU, a bad chunk, a worker that cannot
open the share) leaves the request on the host path: the worker's connector reads the store and
checks the bytes itself, exactly as without shares. Copies are held up to a byte budget, least
recently used first out, and only with ``HEADROOM_BYTES`` of the parent's GPU left free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from thaw_agents_core.snapshot.block_hashes import block_hash_chain
from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.snapshot.format import check_chunk_crcs
from thaw_agents_core.transport.device_share import share_held
from thaw_agents_core.transport.prefetch import (
    DEFAULT_BUDGET_BYTES,
    HEADROOM_BYTES,
    HeldSnapshot,
    free_device_bytes,
)
from thaw_agents_core.transport.stream_scheduler import StreamScheduler

logger = logging.getLogger("thaw_agents.pool")


class PoolShares:
    """The parent's verified device copies of snapshots, and their share descriptors."""

    def __init__(
        self,
        store_url: str,
        device: torch.device,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        from thaw_agents_core.store.url import attach_url, open_store

        if device.type != "cuda":
            raise ValueError(f"device shares move between CUDA devices, not from {device}")
        self.device = device
        self.budget_bytes = budget_bytes
        self.store = open_store(attach_url(store_url))
        self.copier = StreamScheduler(device)
        if hasattr(self.store, "arena_view"):  # shared memory: DMA straight from the arena
            self.copier.register_host(self.store.arena_view())
        self._held: OrderedDict[tuple[str, str], tuple[HeldSnapshot, dict[str, Any]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.counts = {"copied": 0, "shared": 0, "skipped": 0, "evicted": 0}

    def descriptor(
        self, prompt_ids: list[int], namespace_key: str, block_size: int
    ) -> dict[str, Any] | None:
        """The share of the longest snapshot of ``prompt_ids`` (None: none, or not shareable
        now; the worker then takes the host path). Blocks while a first copy is made."""
        chain = block_hash_chain(prompt_ids, block_size)
        match = self.store.lookup(namespace_key, chain) if chain else None
        if match is None:
            return None
        ref = match.ref
        key = (ref.namespace_key, ref.snapshot_id)
        with self._lock:
            found = self._held.get(key)
            if found is None:
                found = self._copy(ref)
                if found is None:
                    self.counts["skipped"] += 1
                    return None
                self._held[key] = found
            self._held.move_to_end(key)
            self.counts["shared"] += 1
            return found[1]

    def _copy(self, ref: Any) -> tuple[HeldSnapshot, dict[str, Any]] | None:
        began = time.perf_counter()
        view = None
        try:
            view = self.store.open(ref)
            header = view.header
            if header.namespace.key() != ref.namespace_key or not self._make_room(
                header.payload_bytes
            ):
                return None
            payload = torch.empty(header.payload_bytes, dtype=torch.uint8, device=self.device)
            chunk_bytes = header.blocks_per_chunk * header.block_bytes
            crcs = self.copier.to_device(view.payload, payload, chunk_bytes).tolist()
            check_chunk_crcs(header, crcs)
        except (SnapshotError, LookupError, OSError, ValueError, torch.cuda.OutOfMemoryError) as e:
            logger.warning(
                "thaw: no device share of %s: %s: %s", ref.snapshot_id, type(e).__name__, e
            )
            return None
        finally:
            if view is not None:
                view.close()
        held = HeldSnapshot(header, payload, time.perf_counter() - began)
        self.counts["copied"] += 1
        return held, share_held(held)

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.budget_bytes:
            return False
        while self._held and self.held_bytes() + nbytes > self.budget_bytes:
            self._evict_oldest()
        free = free_device_bytes(self.device)
        while self._held and free < nbytes + HEADROOM_BYTES:
            free += self._evict_oldest()
        return free >= nbytes + HEADROOM_BYTES

    def _evict_oldest(self) -> int:
        _, (held, _) = self._held.popitem(last=False)
        self.counts["evicted"] += 1
        return held.payload.numel()

    def held_bytes(self) -> int:
        """Bytes of the parent's GPU the copies take."""
        return sum(held.payload.numel() for held, _ in self._held.values())

    def forget(self) -> None:
        """Drop every copy (weights changed: their namespace is never loaded again)."""
        with self._lock:
            self._held.clear()

    def close(self) -> None:
        """Drop the copies, unregister the arena, close the store."""
        self.forget()
        self.copier.close()
        self.store.close()
