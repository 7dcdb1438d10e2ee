"""A private asyncio event loop on a daemon thread, reachable from any thread or loop.

Engines and pools keep their asyncio objects (vLLM's AsyncLLM, worker sockets) on one loop of
their own; callers on other loops or plain threads submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any


class LoopThread:
    """A daemon thread running one asyncio loop until ``stop``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future:
        """Schedule ``coro`` on this loop from any thread; a concurrent Future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float) -> None:
        """Stop the loop and join its thread for up to ``timeout_s`` seconds (then close it)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()

    async def call(self, coro: Any) -> Any:
        """Await ``coro`` on this loop from a coroutine running on another loop."""
        return await asyncio.wrap_future(self.submit(coro))
