"""One vLLM ``AsyncLLM`` per engine spec, driven from a private event-loop thread.

Why a private loop: ``AsyncLLM`` binds its output-handler task to the loop it first runs on.
Callers come from many loops (``asyncio.run`` per sync call, Jupyter's loop, LangGraph's) and
from plain threads, so the engine lives on one loop of its own and every call crosses over:

    caller (any loop / any thread)            engine loop thread            engine-core process
    -------------------------------            ------------------            -------------------
    stream() / stream_sync()  --submit-->      AsyncLLM.generate()  --zmq-->  scheduler + model
           ^                                          |
           +------ call_soon_threadsafe / queue ------+   (one RequestOutput at a time)

Cancelling the caller cancels the producer on the engine loop; ``AsyncLLM.generate`` then
aborts the request inside the engine, so an abandoned call never keeps decoding.

Engines are shared: every ``ChatThaw`` (and fork_fanout parent) with the same ``EngineSpec``
gets the same ``Engine`` from ``acquire_engine``; the last ``release_engine`` or interpreter exit
shuts it down.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from thaw_agents_core.engine import reaper
from thaw_agents_core.engine.errors import EngineError
from thaw_agents_core.engine.spec import EngineSpec
from thaw_agents_core.engine.weights import EngineWeights
from thaw_agents_core.util import compat
from thaw_agents_core.util.loop_thread import LoopThread

logger = logging.getLogger("thaw_agents.engine")
_DONE = object()
_POLL_S = 0.5


@dataclass
class Engine(EngineWeights):
    """A started-on-demand vLLM ``AsyncLLM`` plus the tokenizer of its model (its weight
    swaps, freezes and buffers: :class:`~.weights.EngineWeights`)."""

    spec: EngineSpec
    start_timeout_s: float = 1800.0
    max_restarts: int = 3
    """How many times a dead engine is replaced by a fresh one before calls keep failing."""
    num_restarts: int = field(default=0, init=False)
    _llm: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _loop: LoopThread | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _closed: bool = field(default=False, init=False)
    _store: Any = field(default=None, init=False, repr=False)
    _reaper: Any = field(default=None, init=False, repr=False)
    _weights_version: str | None = field(default=None, init=False, repr=False)
    last_weights_file: str | None = field(default=None, init=False, repr=False)
    """The ``.thaw`` file of the last swap (None: boot weights, or a buffer / state dict)."""
    _weights_failure: str | None = field(default=None, init=False, repr=False)
    """Why the weights are not a verified set (a swap failed part-way), else None."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_started(self) -> bool:
        """Whether the vLLM engine has been started (does not start it)."""
        return self._llm is not None

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, loaded in this process (no engine needed)."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.spec.model)
        return self._tokenizer

    @property
    def llm(self) -> Any:
        """The running ``AsyncLLM`` (starts it if needed)."""
        self.start()
        return self._llm

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop (on its own thread) that runs the ``AsyncLLM`` (starts it if needed)."""
        self.start()
        assert self._loop is not None
        return self._loop.loop

    def start(self) -> None:
        """Start the engine if it is not running (thread-safe, idempotent).

        An engine that died (any cause) is replaced here by a fresh one, at most
        ``max_restarts`` times; the calls that were in flight got ``EngineError``.
        """
        llm = self._llm
        if llm is not None and not llm.errored:
            return
        with self._lock:
            if self._closed:
                raise EngineError("this engine was closed; create a new ChatThaw to start another")
            restarted = self._llm is not None
            if restarted:
                if not self._llm.errored:
                    return
                self._discard_dead_engine()
            compat.configure_vllm_environment()
            self._check_parallel()
            self._open_store()
            self._loop = LoopThread(f"thaw-engine-{Path(self.spec.model).name}")
            future = self._loop.submit(self._create())
            began = time.perf_counter()
            try:
                self._llm = future.result(self.start_timeout_s)
                logger.info(
                    "thaw: vLLM engine for %s started in %.1f s",
                    self.spec.model,
                    time.perf_counter() - began,
                )
                # vLLM's engine core outlives a SIGKILLed parent: a reaper ends it (reaper.py).
                self._reaper = reaper.watch(compat.engine_core_pids(self._llm))
                # Run our shutdown before the exit hooks vLLM just registered (its weakref
                # finalizers stop the engine core under a still-reading output handler, which
                # then logs an EngineDeadError traceback at every interpreter exit).
                atexit.unregister(self.close)
                atexit.register(self.close)
                if restarted:
                    self._reapply_weights()  # the new engine booted the spec's weights
            except concurrent.futures.TimeoutError as exc:
                future.cancel()
                raise EngineError(
                    f"vLLM engine for {self.spec.model} did not start within "
                    f"{self.start_timeout_s:.0f} s"
                ) from exc
            except Exception as exc:
                self._loop.stop(5.0)
                self._loop = None
                self._close_store()
                raise EngineError(
                    f"vLLM engine for {self.spec.model} failed to start: {exc}"
                ) from exc

    def _check_parallel(self) -> None:
        """The connector's pipeline-stage rule, checked before anything starts (inside the
        engine core its error would only reach the logs)."""
        if self.store_url is not None:
            from thaw_agents_core.connector.settings import check_pipeline_stages

            try:
                check_pipeline_stages(self.spec.engine_kwargs.get("pipeline_parallel_size") or 1)
            except ValueError as exc:
                raise EngineError(str(exc)) from None

    @property
    def store_url(self) -> str | None:
        """URL of the KV snapshot store this engine's connector uses (None: no connector)."""
        settings = self.spec.connector_settings
        return settings.store if settings is not None else None

    @property
    def store(self) -> Any:
        """This process's handle on the snapshot store (it owns a shared-memory store it made)."""
        self.start()
        return self._store

    def _open_store(self) -> None:
        # Opened here, before the engine: for shm:// this process creates and owns the arena
        # (engine processes only attach), so it outlives engine restarts and worker deaths.
        if self.store_url is not None and self._store is None:
            from thaw_agents_core.store.url import open_store

            self._store = open_store(self.store_url)

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def namespace(self) -> Any:
        """The KV namespace of this engine (what a snapshot must match to be loaded here)."""
        from thaw_agents_core.snapshot.namespace import namespace_for

        return namespace_for(self.llm.vllm_config, self.weights_version)

    async def _create(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        with compat.spawn_main_module():  # unguarded scripts: see compat
            return AsyncLLM.from_engine_args(self.spec.engine_args())

    def _discard_dead_engine(self) -> None:
        """Tear down a dead engine (under ``_lock``) so ``start`` can make a new one; the store
        stays open: snapshots outlive engine restarts."""
        dead_error = getattr(self._llm, "dead_error", None)
        if self.num_restarts >= self.max_restarts:
            raise EngineError(
                f"the vLLM engine for {self.spec.model} died again after "
                f"{self.num_restarts} restarts; not restarting: {dead_error}"
            )
        self.num_restarts += 1
        logger.warning(
            "thaw: the vLLM engine for %s died (%s); starting a new one (restart %d of at most %d)",
            self.spec.model,
            dead_error,
            self.num_restarts,
            self.max_restarts,
        )
        llm, loop = self._llm, self._loop
        self._llm = None
        self._loop = None
        self._stop(llm, loop, timeout_s=30.0)

    def close(self, timeout_s: float = 60.0) -> None:
        """Shut the engine down (engine-core process included). Safe to call twice."""
        with self._lock:
            self._closed = True
            llm, loop = self._llm, self._loop
            self._llm = None
            self._loop = None
        self._stop(llm, loop, timeout_s)
        self._close_store()

    def _stop(self, llm: Any, loop: LoopThread | None, timeout_s: float) -> None:
        if llm is not None and loop is not None:

            async def _shutdown() -> None:
                # Stop reading outputs first: otherwise the handler sees the engine core go
                # away and logs an EngineDeadError traceback for an orderly shutdown.
                handler = getattr(llm, "output_handler", None)
                if handler is not None:
                    handler.cancel()
                llm.shutdown(timeout=timeout_s)

            try:
                loop.submit(_shutdown()).result(timeout_s)
            except Exception:  # noqa: BLE001 - best effort at shutdown; the process may be gone
                pass
        if loop is not None:
            loop.stop(timeout_s)
        reaper.stop(self._reaper)
        self._reaper = None

    def info(self) -> dict[str, Any]:
        """What this engine runs (starts it): model, context, restarts, and the vLLM features
        that matter for forks (cascade attention for shared prefixes, model runner, async
        scheduling; see ``compat.shared_prefix_engine_defaults``)."""
        llm = self.llm
        return {
            "model": self.spec.model,
            "max_model_len": self.max_model_len,
            "num_restarts": self.num_restarts,
            "has_connector": self.store_url is not None,
            **compat.engine_features(llm.vllm_config),
        }

    @property
    def max_model_len(self) -> int:
        """The engine's context length in tokens (starts it)."""
        return int(self.llm.model_config.max_model_len)

    def check_alive(self) -> None:
        """Raise EngineError if the started engine has died (no-op when not started)."""
        llm = self._llm
        if llm is not None and llm.errored:
            raise EngineError(f"the vLLM engine died: {llm.dead_error}")

    # ------------------------------------------------------------------ requests

    def new_request_id(self) -> str:
        """A fresh unique vLLM request id (``thaw-<32 hex>``)."""
        return f"thaw-{uuid.uuid4().hex}"

    def _start_request(
        self,
        prompt_ids: list[int],
        params: Any,
        request_id: str | None,
        push: Callable[[Any], None],
    ) -> concurrent.futures.Future:
        """Run one request on the engine loop; ``push`` gets each output, then ``_DONE`` or the
        exception. Cancelling the returned future aborts the request in vLLM."""
        llm = self.llm
        assert self._loop is not None
        self.check_weights()
        request_id = request_id or self.new_request_id()

        async def produce() -> None:
            try:
                async for out in llm.generate(compat.tokens_prompt(prompt_ids), params, request_id):
                    push(out)
                push(_DONE)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                push(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        return self._loop.submit(produce())

    async def stream(
        self,
        prompt_ids: list[int],
        params: Any,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Any]:
        """Yield vLLM ``RequestOutput``s for one request; usable from any event loop.

        ``timeout_s`` bounds the whole request; on expiry the request is aborted in the engine
        and ``TimeoutError`` is raised.
        """
        caller_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def push(item: Any) -> None:
            if not caller_loop.is_closed():
                caller_loop.call_soon_threadsafe(outputs.put_nowait, item)

        producer = self._start_request(prompt_ids, params, request_id, push)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                if deadline is None:
                    item = await outputs.get()
                else:
                    try:
                        item = await asyncio.wait_for(
                            outputs.get(), max(0.0, deadline - time.monotonic())
                        )
                    except asyncio.TimeoutError:
                        raise TimeoutError(_timeout_message(timeout_s)) from None
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise _translate(item)
                yield item
        finally:
            if not producer.done():
                producer.cancel()  # -> CancelledError in generate() -> vLLM aborts the request

    def stream_sync(
        self,
        prompt_ids: list[int],
        params: Any,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[Any]:
        """Blocking twin of ``stream`` for plain code (works inside a running event loop)."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        producer = self._start_request(prompt_ids, params, request_id, outputs.put)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                # Checked before every wait, not only when the queue is empty: a streaming
                # request delivers a token every few ms and would otherwise never time out.
                wait_s = _POLL_S
                if deadline is not None:
                    wait_s = min(_POLL_S, deadline - time.monotonic())
                    if wait_s <= 0:
                        raise TimeoutError(_timeout_message(timeout_s))
                try:
                    item = outputs.get(timeout=wait_s)
                except queue.Empty:
                    self.check_alive()
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise _translate(item)
                yield item
        finally:
            if not producer.done():
                producer.cancel()

    async def run_prefill(self, prompt_ids: list[int]) -> None:
        """Compute a prompt once (one token out), so later prompts sharing it hit the cache."""
        from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params

        params = to_sampling_params(GenerationOptions(max_tokens=1, temperature=0.0), stream=False)
        async for _ in self.stream(list(prompt_ids), params):
            pass

    def run_sync(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the engine loop and wait for its result."""
        assert self._loop is not None or self.llm is not None
        assert self._loop is not None
        return self._loop.submit(coro).result(timeout_s)


def _timeout_message(timeout_s: float | None) -> str:
    return (
        f"the request did not finish within timeout={timeout_s} s and was aborted; raise "
        "the timeout or lower max_tokens"
    )


def _translate(exc: BaseException) -> BaseException:
    """vLLM's request-validation errors become ValueError; engine death becomes EngineError."""
    name = type(exc).__name__
    if name == "EngineDeadError":
        return EngineError(f"the vLLM engine died: {exc}")
    if isinstance(exc, ValueError) or name in ("VLLMValidationError", "VLLMClientError"):
        return ValueError(str(exc))
    return exc


# ---------------------------------------------------------------------- shared engines
