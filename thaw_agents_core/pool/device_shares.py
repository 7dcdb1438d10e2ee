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

The parent's copies are a DevicePrefetcher's (transport/prefetch.py: checked against the
namespace the workers serve, held up to a byte budget, least recently used first out, only
with room to spare on the GPU, dropped on a weight swap). Anything that fails on the way (no
room, a bad chunk, a file store's pageable memory, a worker that cannot open the share) leaves
the request on the host path: the worker's connector reads the store and checks the bytes
itself, exactly as without shares.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from thaw_agents_core.snapshot.block_hashes import block_hash_chain
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.transport.device_share import share_held
from thaw_agents_core.transport.prefetch import DEFAULT_BUDGET_BYTES, DevicePrefetcher
from thaw_agents_core.transport.stream_scheduler import StreamScheduler

COPY_TIMEOUT_S = 30.0
"""How long a request waits for its snapshot's first copy to the parent's GPU at most."""


class PoolShares:
    """The parent's verified device copies of snapshots, handed out as share descriptors."""

    def __init__(
        self,
        store_url: str,
        device: torch.device,
        namespace: Callable[[], Namespace | None],
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        from thaw_agents_core.store.url import attach_url, open_store

        if device.type != "cuda":
            raise ValueError(f"device shares move between CUDA devices, not from {device}")
        self.store = open_store(attach_url(store_url))
        self.copier = StreamScheduler(device)
        if hasattr(self.store, "arena_view"):  # shared memory: DMA straight from the arena
            self.copier.register_host(self.store.arena_view())
        self._namespace = namespace
        self._current: Namespace | None = None  # the namespace of the share being made
        self.prefetcher = DevicePrefetcher(
            device, lambda: self.store, lambda: self._current, budget_bytes, self.copier
        )
        self._lock = threading.Lock()

    def share(self, prompt_ids: list[int], skip: set[str]) -> dict[str, Any] | None:
        """The share of the longest snapshot of ``prompt_ids``, unless its id is in ``skip``
        (the worker holds it already); None when there is none or it cannot be shared now.
        Blocks while a first copy is made (at most COPY_TIMEOUT_S)."""
        with self._lock:
            self._current = namespace = self._namespace()
            if namespace is None:
                return None
            chain = block_hash_chain(prompt_ids, namespace.block_size)
            match = self.store.lookup(namespace.key(), chain) if chain else None
            if match is None or match.ref.snapshot_id in skip:
                return None
            deadline = time.monotonic() + COPY_TIMEOUT_S
            while (status := self.prefetcher.status(match.ref)) is None:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.0005)
            held = self.prefetcher.take(match.ref) if status is True else None
            return share_held(held) if held is not None else None

    def forget(self) -> None:
        """Drop every copy (weights changed: their namespace is never loaded again)."""
        self.prefetcher.forget()

    def close(self) -> None:
        """Drop the copies, unregister the arena, close the store."""
        self.prefetcher.close()
        self.copier.close()
        self.store.close()
