"""The weight-swap fence both pools share (ForkPool over pipes, RayForkPool over Ray).

    load_weights(src, version)           any thread; returns the new weights_version
      -> _swap set: new requests wait (each pool's send path awaits it)
      -> in-flight requests finish (under the old weights), bounded by ``timeout_s``
      -> _swap_workers: every live worker at once, through the pool's own transport
         (``_swap_worker``: vLLM collective_rpc in the worker, CRC-verified, prefix cache
         reset); the pool records the new version and namespace; a worker that fails is
         dropped (``_drop_worker``: killed, then replaced), never left serving old weights
      -> _swap released: held requests run on the new version only
So one fork_fanout round never mixes weight versions across a pool. A replacement started after
a swap re-loads the last ``.thaw`` file source (``_last_weights``) before it serves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class PoolError(RuntimeError):
    """The pool could not start, or a request failed on every try."""


class WeightSwapFence:
    """Mixin: ``load_weights`` behind a fence. The pool provides ``_loop`` (a LoopThread),
    ``_closed``, ``_swap`` and ``_last_weights`` (None), ``weights_version``,
    ``expected_namespace_key``, ``_workers`` (each with ``index``, ``alive``, ``generation``),
    ``_has_in_flight()``, ``_swap_worker`` and ``_drop_worker``."""

    _loop: Any
    _closed: bool
    _swap: asyncio.Future | None
    _last_weights: dict[str, Any] | None
    _workers: list[Any]
    weights_version: str
    expected_namespace_key: str | None
    worker_kind: str

    def _has_in_flight(self) -> bool:
        raise NotImplementedError

    async def _swap_worker(
        self, worker: Any, source: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Load ``source`` into one worker; its reply (``namespace_key``, stats)."""
        raise NotImplementedError

    def _drop_worker(self, worker: Any, generation: int, reason: str) -> None:
        """Take that incarnation of the worker out of service (it is replaced)."""
        raise NotImplementedError

    async def _swap_workers(self, source: dict[str, Any], version: str, deadline: float) -> None:
        """Load ``source`` into every live worker at once; record the new version."""
        live = [(w, w.generation) for w in self._workers if w.alive]
        replies = await asyncio.gather(
            *(self._swap_worker(w, source, max(1.0, deadline - time.monotonic())) for w, _ in live),
            return_exceptions=True,
        )
        self.weights_version = version
        self._last_weights = source if source["source"].get("kind") == "file" else None
        keys = {r["namespace_key"] for r in replies if not isinstance(r, BaseException)}
        if len(keys) == 1:
            self.expected_namespace_key = keys.pop()
        failed, swapped = [], set()
        for (worker, generation), reply in zip(live, replies):
            if isinstance(reply, BaseException):  # never serve old or unverified weights
                failed.append((worker.index, f"{type(reply).__name__}: {reply}"))
                self._drop_worker(worker, generation, "load_weights failed")
            else:
                swapped.add((worker.index, generation))
        for worker in self._workers:  # a replacement that came up during the swap: old weights
            if worker.alive and (worker.index, worker.generation) not in swapped:
                self._drop_worker(worker, worker.generation, "started on the previous weights")
        if failed:
            raise PoolError(
                f"{self.worker_kind} worker(s) failed to load weights {version!r}: {failed}"
            )

    def load_weights(
        self,
        src: Any,
        weights_version: str | None = None,
        *,
        layout: str = "auto",
        timeout_s: float = 600.0,
    ) -> str:
        """Hot-swap every worker to new weights, no restart; returns the new weights_version.

        ``src`` as ``Engine.load_weights`` (a ``.thaw`` path or ``s3://`` URL, a
        ``WeightsBuffer``, a state dict); a replacement worker re-loads a ``.thaw`` file source
        before it serves. See the module docstring for the fence.
        """
        from thaw_agents_core.weights.sources import describe, resolve_version

        if self._loop is None or self._closed:
            raise PoolError("the pool is not running: start it before load_weights")
        version = resolve_version(src, weights_version, self.weights_version)
        desc, cleanup = describe(src, version, layout)
        try:
            self._loop.submit(self._fenced_swap(desc, version, timeout_s)).result(timeout_s + 30)
        finally:
            cleanup()
        return version

    async def _fenced_swap(self, desc: dict[str, Any], version: str, timeout_s: float) -> None:
        while self._swap is not None:
            await asyncio.shield(self._swap)
        self._swap = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + timeout_s
        try:
            while self._has_in_flight():  # drain: in-flight ones finish first
                if time.monotonic() > deadline:
                    raise PoolError(
                        f"requests still in flight after {timeout_s} s; weights not swapped"
                    )
                await asyncio.sleep(0.02)
            await self._swap_workers(
                {"source": desc, "weights_version": version}, version, deadline
            )
        finally:
            swap, self._swap = self._swap, None
            swap.set_result(None)
