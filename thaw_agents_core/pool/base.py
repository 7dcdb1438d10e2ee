"""What ForkPool (worker processes) and RayForkPool (Ray actors) share: the public surface.

    generate(ids, options)          any thread or loop
      -> checks (started, not closed), ``on_delta`` bound to the caller's loop and context
      -> the pool's loop thread: _generate(ids, options, on_delta, worker, timeout_s)
         (each pool's own transport), _pick: ``worker`` if alive, else the least loaded
    start() / astart() / with / async with / close()
    load_weights (the fence: weights_fence.py)

A pool keeps its workers in ``_workers``; each has ``index``, ``alive`` and ``pending`` (the
requests in flight on it, by id).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import time
import weakref
from dataclasses import asdict
from typing import Any, Callable

from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.engine.sampling import GenerationOptions
from thaw_agents_core.pool.weights_fence import PoolError, WeightSwapFence

logger = logging.getLogger("thaw_agents.pool")

DeltaCallback = Callable[[str], None]


class WarmPool(WeightSwapFence):
    """Base of the pools: workers, load-aware picking, ``generate`` and the context managers.

    A pool provides ``start()``, ``close()``, ``_generate(...)`` and what WeightSwapFence
    needs, and sets ``_workers``, ``_loop``, ``_closed``, ``start_timeout_s`` and
    ``request_timeout_s``."""

    _workers: list[Any]
    start_timeout_s: float
    request_timeout_s: float | None
    worker_kind = "pool"
    """How errors name a worker ("pool", "Ray")."""

    # ------------------------------------------------------------------ workers

    @property
    def num_workers(self) -> int:
        """Workers the pool runs (alive or being replaced)."""
        return len(self._workers)

    def alive_workers(self) -> list[int]:
        """Indices of the workers alive now."""
        return [w.index for w in self._workers if w.alive]

    def load(self) -> dict[int, int]:
        """In-flight requests per live worker."""
        return {w.index: len(w.pending) for w in self._workers if w.alive}

    def _has_in_flight(self) -> bool:
        return any(w.pending for w in self._workers)

    async def _pick(self, preferred: int | None) -> Any:
        """``preferred`` if it is alive, else the live worker with the fewest requests in
        flight; waits (up to ``start_timeout_s``) while replacements start."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            live = [w for w in self._workers if w.alive]
            if preferred is not None and any(w.index == preferred for w in live):
                return self._workers[preferred]
            if live:
                return min(live, key=lambda w: (len(w.pending), w.index))
            if self._closed:
                raise PoolError("the pool was closed")
            if time.monotonic() > deadline:
                raise PoolError(f"no live {self.worker_kind} worker (all died and none came back)")
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Any:
        raise NotImplementedError

    async def _shutdown(self, timeout_s: float) -> None:
        """On the pool's loop: ask every worker to stop, fail what is still pending."""
        raise NotImplementedError

    def _kill_all(self, timeout_s: float) -> None:
        """After the loop stopped: make sure no worker process is left."""
        raise NotImplementedError

    def _track(self) -> None:
        """Close this pool at interpreter exit if nobody did (see :func:`close_live_pools`)."""
        _live_pools.add(self)
        atexit.unregister(close_live_pools)
        atexit.register(close_live_pools)  # exit hooks run last in, first out: before Ray's

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every worker (politely, then by force); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _live_pools.discard(self)
        if self._loop is not None:
            try:
                self._loop.submit(self._shutdown(timeout_s)).result(timeout_s + 10)
            except Exception as exc:  # noqa: BLE001 - fall through to the hard kill below
                logger.warning("thaw: %s shutdown: %s", type(self).__name__, exc)
            self._loop.stop(5.0)
        self._kill_all(timeout_s)

    async def astart(self) -> Any:
        """Async :meth:`start` (runs it in a thread)."""
        await asyncio.to_thread(self.start)
        return self

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return await self.astart()

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        prompt_ids: list[int],
        options: GenerationOptions,
        *,
        on_delta: DeltaCallback | None = None,
        worker: int | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        """Run one request on a worker (the least loaded, or ``worker``); usable from any loop.

        ``on_delta`` gets each new piece of text, called on the caller's loop and in its
        context (LangGraph's stream writer and run config live in context variables).
        ``timeout_s`` (default ``request_timeout_s``): past it the request is aborted in its
        worker and TimeoutError raised.
        """
        if self._loop is None:
            raise PoolError("the pool is not started: call start() or use it as a context manager")
        if self._closed:  # its loop is stopped: a request sent there would wait forever
            raise PoolError("the pool is closed: start a new one")
        if on_delta is not None:
            caller, callback = asyncio.get_running_loop(), on_delta
            context = contextvars.copy_context()  # the pool's thread has none of the caller's
            on_delta = lambda text: caller.call_soon_threadsafe(  # noqa: E731
                callback, text, context=context
            )
        options_json = {k: v for k, v in asdict(options).items() if v is not None}
        timeout = timeout_s if timeout_s is not None else self.request_timeout_s
        return await self._loop.call(
            self._generate(list(prompt_ids), options_json, on_delta, worker, timeout)
        )

    async def _generate(
        self,
        prompt_ids: list[int],
        options: dict[str, Any],
        on_delta: DeltaCallback | None,
        worker: int | None,
        timeout_s: float | None,
    ) -> GenerationResult:
        """On the pool's loop: run the request on a worker (the pool's own transport)."""
        raise NotImplementedError


_live_pools: weakref.WeakSet[WarmPool] = weakref.WeakSet()


def close_live_pools() -> None:
    """At interpreter exit: close every pool still running (its workers, its arenas)."""
    for pool in list(_live_pools):
        pool.close(timeout_s=10.0)
