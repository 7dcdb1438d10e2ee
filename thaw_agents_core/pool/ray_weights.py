"""RayForkPool's weight updates: ``load_weights`` fenced by ``weights_version``, through Ray.

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

from thaw_agents_core.pool.fork_pool import PoolError


class WeightSwaps:
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

    def load_weights(
        self,
        src: Any,
        weights_version: str | None = None,
        *,
        layout: str = "auto",
        timeout_s: float = 600.0,
    ) -> str:
        """Hot-swap every actor to new weights, no restart; returns the new weights_version.

        The fence of ``ForkPool.load_weights``: new requests wait, in-flight ones finish, every
        live actor loads (vLLM collective_rpc, CRC-verified, prefix cache reset), then requests
        run on the new version only; the KV namespace takes it, so snapshots of the old weights
        are never sent or loaded again. ``src`` as ``Engine.load_weights``; on other hosts a
        ``.thaw`` path must name the same file on every node (a shared file system), and
        shared-memory or CUDA-IPC sources reach only the driver's host. An actor that fails is
        replaced; replacements re-load a ``.thaw`` file source before they serve.
        """
        from thaw_agents_core.weights.sources import describe, resolve_version

        if self._loop is None or self._closed:
            raise PoolError("the pool is not running: start it before load_weights")
        version = resolve_version(src, weights_version, self.weights_version)
        desc, cleanup = describe(src, version, layout)
        try:
            self._loop.submit(self._load_weights(desc, version, timeout_s)).result(timeout_s + 30)
        finally:
            cleanup()
        return version

    async def _load_weights(self, desc: dict[str, Any], version: str, timeout_s: float) -> None:
        while self._swap is not None:
            await asyncio.shield(self._swap)
        self._swap = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + timeout_s
        try:
            while any(s.pending for s in self._slots):  # drain: in-flight ones finish first
                if time.monotonic() > deadline:
                    raise PoolError(
                        f"requests still in flight after {timeout_s} s; weights not swapped"
                    )
                await asyncio.sleep(0.02)
            source = {"source": desc, "weights_version": version}
            live = [(s, s.generation) for s in self._slots if s.alive]
            replies = await asyncio.gather(
                *(
                    self._swap_worker(s.actor, source, max(1.0, deadline - time.monotonic()))
                    for s, _ in live
                ),
                return_exceptions=True,
            )
            self.weights_version = version
            self._last_weights = source if desc.get("kind") == "file" else None
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
        finally:
            swap, self._swap = self._swap, None
            swap.set_result(None)

    async def _swap_worker(
        self, actor: Any, source: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        reply = await asyncio.wait_for(actor.load_weights.remote(json.dumps(source)), timeout_s)
        return json.loads(reply)
