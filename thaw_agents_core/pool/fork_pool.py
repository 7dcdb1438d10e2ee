"""ForkPool: warm worker processes, each a vLLM engine that loads prefixes from snapshots.

    parent process                                       worker i (worker.py)
    ForkPool (own event-loop thread)                     BranchEngine: in-process LLMEngine
      generate(ids, options) --pick least loaded-->      + ThawConnector; add / step / ...
        <-- delta / done / error frames (wire.py) ------ (JSON over a Unix socket pair)

Placement (:mod:`.placement`): one core per worker on CPU; on GPU a device (its own when
there are several, the parent keeping the first) or a memory share of the parent's.
``device_shares=True`` (CUDA, opt-in until measured on several GPUs) sends each request's prefix
snapshot GPU to GPU instead of through host memory (:mod:`.device_shares`).

Failure handling (every wait on another process has a deadline):
- start: a worker that is not ready within ``start_timeout_s`` is killed and reported;
- a worker that dies (socket end-of-file, exit, no pong within ``ping_timeout_s``) is
  replaced, and its in-flight requests are re-sent to live workers, at most ``max_retries``
  times each;
- a request that exceeds ``request_timeout_s`` is aborted in its worker (TimeoutError);
- ``close()`` (also ``with``, and at interpreter exit) asks workers to stop, then terminates
  and finally kills them; workers also die with the parent process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.engine.spec import EngineSpec
from thaw_agents_core.pool import wire
from thaw_agents_core.pool.base import DeltaCallback, WarmPool
from thaw_agents_core.pool.placement import Placement, default_placements
from thaw_agents_core.pool.weights_fence import PoolError
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.util import compat
from thaw_agents_core.util.loop_thread import LoopThread

logger = logging.getLogger("thaw_agents.pool")


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    options: dict[str, Any]
    stream: bool
    on_delta: DeltaCallback | None
    future: asyncio.Future
    deadline: float | None
    worker: int = -1
    retries: int = 0


@dataclass
class _Worker:
    index: int
    placement: Placement
    proc: subprocess.Popen | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Future | None = None
    log_path: str = ""
    pending: dict[str, _Request] = field(default_factory=dict)
    namespace: Namespace | None = None  # what it serves: the ready frame's, then each swap's
    weights_version: str = ""
    generation: int = 0  # how many times this worker was started
    shared: set[str] = field(default_factory=set)  # snapshot ids sent to it as device shares
    alive: bool = False
    last_pong: float = 0.0
    last_ping: float = 0.0

    @property
    def namespace_key(self) -> str:
        """Its namespace's key ("" before it is ready)."""
        return self.namespace.key() if self.namespace is not None else ""


class ForkPool(WarmPool):
    """N warm vLLM worker processes sharing a snapshot store with their parent."""

    def __init__(
        self,
        spec: EngineSpec,
        num_workers: int = 2,
        *,
        placements: list[Placement] | None = None,
        gpu_memory_fraction: float = 0.25,
        start_timeout_s: float = 900.0,
        request_timeout_s: float | None = None,
        ping_interval_s: float = 5.0,
        ping_timeout_s: float = 60.0,
        max_retries: int = 2,
        expected_namespace_key: str | None = None,
        device_shares: bool = False,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if spec.kv_transfer_json is None:
            raise ValueError(
                "pool workers load prefixes through ThawConnector: the spec needs "
                "a KV store (ChatThaw(kv_store=...) or kv_transfer=...)"
            )
        if device_shares and compat.is_cpu_platform():
            raise ValueError("device_shares=True needs CUDA: snapshots move GPU to GPU")
        self.spec = spec
        self.device_shares = device_shares
        """Send each request's prefix snapshot GPU to GPU (pool/device_shares.py)."""
        self.placements = placements or default_placements(num_workers, gpu_memory_fraction)
        if len(self.placements) != num_workers:
            raise ValueError(f"{len(self.placements)} placements for {num_workers} workers")
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_retries = max_retries
        self.expected_namespace_key = expected_namespace_key
        self.log_dir = tempfile.mkdtemp(prefix="thaw-pool-")
        self.replacements = 0
        self._workers = [_Worker(i, p) for i, p in enumerate(self.placements)]
        self._ids = itertools.count()
        settings = spec.connector_settings
        self.weights_version = settings.weights_version if settings is not None else ""
        """The weights version every live worker serves (changes with ``load_weights``)."""
        self._swap: asyncio.Future | None = None  # set while load_weights runs: _send holds
        self._control: dict[str, asyncio.Future] = {}  # load_weights replies by message id
        self._last_weights: dict[str, Any] | None = None  # re-applied to replacement workers
        self._loop: LoopThread | None = None
        self._watchdog: asyncio.Task | None = None
        self._shares: Any = None  # PoolShares, made at start when device_shares
        self._closed = False
        self._track()

    # ------------------------------------------------------------------ lifecycle

    def worker_pids(self) -> list[int]:
        """Process ids of the workers alive now."""
        return [w.proc.pid for w in self._workers if w.proc is not None and w.alive]

    def start(self) -> ForkPool:
        """Start every worker and wait until all are ready (blocking)."""
        if self._loop is None:
            self._loop = LoopThread("thaw-pool")
            try:
                self._loop.submit(self._start_all()).result()
            except BaseException:
                self.close()
                raise
        return self

    async def _start_all(self) -> None:
        if self.device_shares:
            import torch

            from thaw_agents_core.pool.device_shares import PoolShares

            self._shares = PoolShares(
                self.spec.connector_settings.store, torch.device("cuda", 0), self._namespace
            )
        await asyncio.gather(*(self._spawn(w) for w in self._workers))
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self, worker: _Worker) -> None:
        worker.generation += 1
        worker.shared = set()
        parent_sock, child_sock = socket.socketpair()
        config = {
            "spec": asdict(self.spec),
            "cpu_cores": worker.placement.cpu_cores,
            "engine_overrides": worker.placement.engine_overrides,
            "parent_pid": os.getpid(),
        }
        worker.log_path = os.path.join(self.log_dir, f"worker-{worker.index}.log")
        with open(worker.log_path, "ab") as log:
            worker.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "thaw_agents_core.pool.worker",
                    str(child_sock.fileno()),
                    json.dumps(config),
                ],
                pass_fds=[child_sock.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **worker.placement.environment()},
            )
        child_sock.close()
        reader, worker.writer = await asyncio.open_unix_connection(sock=parent_sock)
        worker.ready = asyncio.get_running_loop().create_future()
        worker.pending = {}
        asyncio.get_running_loop().create_task(self._read(worker, reader))
        try:
            message = await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout_s)
        except asyncio.TimeoutError:
            self._kill(worker)
            raise PoolError(
                f"worker {worker.index} was not ready within {self.start_timeout_s}"
                f" s; its log: {self._log_tail(worker)}"
            ) from None
        worker.weights_version = self.weights_version
        if self._last_weights is not None:  # a replacement after a swap: same weights first
            try:
                message = {
                    **message,
                    **await self._swap_worker(worker, self._last_weights, self.start_timeout_s),
                }
            except Exception as exc:  # noqa: BLE001 - never serve the boot weights after a swap
                self._kill(worker)
                raise PoolError(
                    f"worker {worker.index} could not load weights version "
                    f"{self.weights_version!r}: {exc}"
                ) from None
        if self.expected_namespace_key and message["namespace_key"] != self.expected_namespace_key:
            self._kill(worker)
            raise PoolError(
                f"worker {worker.index} has KV namespace {message['namespace_key']}, "
                f"the parent {self.expected_namespace_key}: same model, dtype and "
                "block size are needed to share snapshots"
            )
        worker.namespace = Namespace.from_json(message["namespace"])
        worker.alive, worker.last_pong = True, time.monotonic()
        logger.info(
            "thaw: pool worker %d ready (pid %d, %.1f s)",
            worker.index,
            worker.proc.pid,
            message["startup_s"],
        )

    def _kill_all(self, timeout_s: float) -> None:
        for worker in self._workers:
            self._kill(worker)
        if self._shares is not None:
            self._shares.close()
            self._shares = None

    async def _shutdown(self, timeout_s: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for worker in self._workers:
            worker.alive = False
            if worker.writer is not None and not worker.writer.is_closing():
                try:
                    worker.writer.write(wire.encode({"type": "shutdown"}))
                    await worker.writer.drain()
                except (ConnectionError, RuntimeError):
                    pass
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            while (
                worker.proc is not None
                and worker.proc.poll() is None
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            for request in worker.pending.values():
                if not request.future.done():
                    request.future.set_exception(PoolError("the pool was closed"))

    def _kill(self, worker: _Worker) -> None:
        worker.alive = False
        proc = worker.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _log_tail(self, worker: _Worker, num_bytes: int = 3000) -> str:
        try:
            return Path(worker.log_path).read_bytes()[-num_bytes:].decode(errors="replace")
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ requests

    async def _generate(
        self,
        prompt_ids: list[int],
        options: dict[str, Any],
        on_delta: DeltaCallback | None,
        worker: int | None,
        timeout_s: float | None,
    ) -> GenerationResult:
        request = _Request(
            id=f"fork-{next(self._ids)}",
            prompt_ids=prompt_ids,
            options=options,
            stream=on_delta is not None,
            on_delta=on_delta,
            future=asyncio.get_running_loop().create_future(),
            deadline=None if timeout_s is None else time.monotonic() + timeout_s,
        )
        await self._send(request, preferred=worker)
        try:
            return await request.future
        except asyncio.CancelledError:
            self._abort(request)
            raise

    async def _send(self, request: _Request, preferred: int | None = None) -> None:
        while self._swap is not None:  # hold new requests while weights are being swapped
            await asyncio.shield(self._swap)
        message = {
            "type": "generate",
            "id": request.id,
            "prompt_ids": request.prompt_ids,
            "options": request.options,
            "stream": request.stream,
        }
        worker = await self._pick(preferred)
        if self._shares is not None:  # once per worker and snapshot: it holds the copy then
            share = await asyncio.to_thread(self._shares.share, request.prompt_ids, worker.shared)
            if share is not None:
                message["device_share"] = share
                worker.shared.add(share["snapshot_id"])
        request.worker = worker.index
        worker.pending[request.id] = request
        assert worker.writer is not None
        worker.writer.write(wire.encode(message))
        try:
            await worker.writer.drain()
        except ConnectionError:
            pass  # the reader sees the death and re-sends

    def _namespace(self) -> Namespace | None:
        """The namespace the live workers serve (None while none is ready)."""
        key = self.expected_namespace_key
        return next(
            (
                w.namespace
                for w in self._workers
                if w.alive and w.namespace is not None and (not key or w.namespace_key == key)
            ),
            None,
        )

    def _abort(self, request: _Request) -> None:
        worker = self._workers[request.worker] if request.worker >= 0 else None
        if worker is None or worker.pending.pop(request.id, None) is None:
            return
        if worker.alive and worker.writer is not None and not worker.writer.is_closing():
            worker.writer.write(wire.encode({"type": "abort", "id": request.id}))

    # ------------------------------------------------------------------ worker messages

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        proc = worker.proc
        while True:
            try:
                message = await wire.read_message(reader)
            except wire.WireError as exc:
                logger.warning("thaw: pool worker %d sent a bad frame (%s)", worker.index, exc)
                message = None
            if message is None:
                break
            kind = message["type"]
            if kind == "ready":
                if worker.ready is not None and not worker.ready.done():
                    worker.ready.set_result(message)
            elif kind == "pong":
                worker.last_pong = time.monotonic()
            elif kind == "fatal":
                logger.warning("thaw: pool worker %d failed: %s", worker.index, message["message"])
            elif message.get("id") in self._control:  # load_weights reply
                future = self._control.pop(message["id"])
                if not future.done():
                    if kind == "weights_loaded":
                        future.set_result(message)
                    else:
                        future.set_exception(PoolError(message.get("message", str(message))))
            elif kind in ("delta", "done", "error"):
                self._deliver(worker, message)
        if worker.proc is proc:  # not already replaced
            await self._on_death(worker)

    def _deliver(self, worker: _Worker, message: dict[str, Any]) -> None:
        request = worker.pending.get(message["id"])
        if request is None or request.future.done():
            return
        if message["type"] == "delta":
            if request.on_delta is not None:
                request.on_delta(message["text"])
            return
        del worker.pending[request.id]
        if message["type"] == "error":
            request.future.set_exception(ValueError(message["message"]))
            return
        result = GenerationResult.from_wire(
            message["result"], engine=f"worker-{worker.index}", retries=request.retries
        )
        result.route["weights_version"] = worker.weights_version
        request.future.set_result(result)

    async def _on_death(self, worker: _Worker) -> None:
        was_ready = worker.ready is not None and worker.ready.done()
        worker.alive = False
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_exception(
                PoolError(f"worker {worker.index} exited while starting: {self._log_tail(worker)}")
            )
        self._kill(worker)
        orphans, worker.pending = list(worker.pending.values()), {}
        if self._closed:
            return
        logger.warning(
            "thaw: pool worker %d died (exit %s); replacing it, re-sending %d request(s)",
            worker.index,
            worker.proc.poll() if worker.proc else None,
            len(orphans),
        )
        if was_ready:
            self.replacements += 1
            asyncio.get_running_loop().create_task(self._replace(worker))
        for request in orphans:
            if request.future.done():
                continue
            if request.retries >= self.max_retries:
                request.future.set_exception(
                    PoolError(
                        f"request {request.id} failed: its worker died {request.retries + 1} times"
                    )
                )
                continue
            request.retries += 1
            await self._send(request)

    async def _replace(self, worker: _Worker) -> None:
        try:
            await self._spawn(worker)
        except PoolError as exc:
            logger.error("thaw: could not replace pool worker %d: %s", worker.index, exc)

    # ------------------------------------------------------------------ weights

    def _drop_worker(self, worker: _Worker, generation: int, reason: str) -> None:
        if worker.generation == generation:
            logger.warning("thaw: pool worker %d: %s; killing it", worker.index, reason)
            self._kill(worker)  # the reader sees end-of-file: _on_death replaces it

    async def _swap_workers(self, source: dict[str, Any], version: str, deadline: float) -> None:
        if self._shares is not None:
            self._shares.forget()  # copies of the old weights' KV are never loaded again
        await super()._swap_workers(source, version, deadline)

    async def _swap_worker(
        self, worker: _Worker, source: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Send one load_weights message and await its reply (namespace_key, stats)."""
        message_id = f"weights-{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._control[message_id] = future
        assert worker.writer is not None
        worker.writer.write(wire.encode({"type": "load_weights", "id": message_id, **source}))
        await worker.writer.drain()
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._control.pop(message_id, None)
        worker.weights_version = reply["weights_version"]
        worker.namespace = Namespace.from_json(reply["namespace"])
        return reply

    async def _watch(self) -> None:
        """Deadlines, exits and pings: nothing waits on a worker forever."""
        while not self._closed:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for worker in self._workers:
                if not worker.alive:
                    continue
                if worker.proc is not None and worker.proc.poll() is not None:
                    continue  # the reader sees end-of-file and handles it
                for request in list(worker.pending.values()):
                    if request.deadline is not None and now > request.deadline:
                        self._abort(request)
                        request.future.set_exception(
                            TimeoutError(
                                f"branch request {request.id} exceeded its timeout on worker "
                                f"{worker.index}; aborted"
                            )
                        )
                if now - worker.last_pong > self.ping_timeout_s:
                    logger.warning(
                        "thaw: pool worker %d stopped answering; killing it", worker.index
                    )
                    self._kill(worker)
                elif (
                    now - worker.last_ping > self.ping_interval_s
                    and worker.writer is not None
                    and not worker.writer.is_closing()
                ):
                    worker.last_ping = now
                    worker.writer.write(wire.encode({"type": "ping", "id": int(now)}))
