"""The weight-swap fence both pools share (ForkPool over pipes, RayForkPool over Ray).

    load_weights(src, version)           any thread; returns the new weights_version
      -> _swap set: new requests wait (each pool's send path awaits it)
      -> in-flight requests finish (under the old weights), bounded by ``timeout_s``
      -> _swap_workers(source, version, deadline): the pool's own transport loads every live
         worker (vLLM collective_rpc in each, CRC-verified, prefix cache reset) and records
         the new namespace; a worker that fails is replaced, never left serving old weights
      -> _swap released: held requests run on the new version only
So one fork_fanout round never mixes weight versions across a pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class PoolError(RuntimeError):
    """The pool could not start, or a request failed on every try."""


class WeightSwapFence:
    """Mixin: ``load_weights`` behind a fence. The pool provides ``_loop`` (a LoopThread),
    ``_closed``, ``_swap`` (None), ``weights_version``, ``_has_in_flight()`` and
    ``_swap_workers(source, version, deadline)``."""

    _loop: Any
    _closed: bool
    _swap: asyncio.Future | None
    weights_version: str

    def _has_in_flight(self) -> bool:
        raise NotImplementedError

    async def _swap_workers(self, source: dict[str, Any], version: str, deadline: float) -> None:
        raise NotImplementedError

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
