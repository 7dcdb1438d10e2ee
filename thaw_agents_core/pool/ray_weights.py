"""RayForkPool's weight updates through Ray (the fence itself: weights_fence.py).

load_weights(src, version)          (any thread)
  -> new requests wait (``_swap``), in-flight ones finish
  -> every live EngineActor: load_weights.remote(JSON descriptor) (weights.sources.describe)
  -> pool.weights_version, expected_namespace_key = the new ones; a failed actor is replaced
     (its replacement re-loads a ``.thaw`` file source before it serves)
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from thaw_agents_core.pool.weights_fence import PoolError, WeightSwapFence


class WeightSwaps(WeightSwapFence):
    """The weights half of RayForkPool (a mixin: it uses the pool's slots and event loop)."""

    _loop: Any
    _closed: bool
    _slots: list[Any]
    _swap: asyncio.Future | None
    _last_weights: dict[str, Any] | None
    weights_version: str
    expected_namespace_key: str | None

    def _on_death(self, slot: Any, generation: int, reason: str) -> None:
        raise NotImplementedError

    def _has_in_flight(self) -> bool:
        return any(s.pending for s in self._slots)

    async def _swap_workers(self, source: dict[str, Any], version: str, deadline: float) -> None:
        """Load ``source`` into every live actor (the fence is ``WeightSwapFence``'s). On other
        hosts a ``.thaw`` path must name the same file on every node (a shared file system);
        shared-memory or CUDA-IPC sources reach only the driver's host."""
        live = [(s, s.generation) for s in self._slots if s.alive]
        replies = await asyncio.gather(
            *(
                self._swap_worker(s.actor, source, max(1.0, deadline - time.monotonic()))
                for s, _ in live
            ),
            return_exceptions=True,
        )
        self.weights_version = version
        self._last_weights = source if source["source"].get("kind") == "file" else None
        keys = {r["namespace_key"] for r in replies if not isinstance(r, BaseException)}
        if len(keys) == 1:
            self.expected_namespace_key = keys.pop()
        failed = [
            (s.index, f"{type(r).__name__}: {r}")
            for (s, _), r in zip(live, replies)
            if isinstance(r, BaseException)
        ]
        for (slot, generation), reply in zip(live, replies):
            if isinstance(reply, BaseException):  # never serve old or unverified weights
                self._on_death(slot, generation, "load_weights failed")
            else:
                slot.namespace_key = reply["namespace_key"]
        if failed:
            raise PoolError(f"Ray worker(s) failed to load weights {version!r}: {failed}")

    async def _swap_worker(
        self, actor: Any, source: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        reply = await asyncio.wait_for(actor.load_weights.remote(json.dumps(source)), timeout_s)
        return json.loads(reply)
