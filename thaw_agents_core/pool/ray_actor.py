"""The engine actor of a RayForkPool (one per worker) and the driver's helpers for actors.

    EngineActor (async actor; num_cpus=1 on CPU, num_gpus=1 on GPU, in a placement-group bundle)
      info()                      node id and pid (cheap: the engine is not started yet)
      start_engine(config)        in-process vLLM ``LLMEngine`` + ThawConnector on the node's store
      generate(request)           streaming generator of JSON frames: delta*, then done | error
      abort(id) / ping() / shutdown()
      load_weights(source)        hot swap between two engine steps (weights/, collective_rpc)
(Each node's store actor, ``NodeStore``, lives in ray_transport with the rest of the shipping.)

The engine lives on one thread of its own (vLLM's engine is not thread-safe): it drains an inbox
of add / abort commands, runs one step, and hands each output to the asyncio loop of the actor,
where ``generate`` forwards it. Frames and arguments are JSON text (same fields as pool/wire.py).
Nothing here imports vLLM or torch at import time: the actor sets its environment first.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import traceback
from typing import Any

from thaw_agents_core.pool.branch_engine import BranchEngine
from thaw_agents_core.util.process_identity import pid_space, process_start_ticks


class _EngineThread:
    """A :class:`BranchEngine` driven by a thread; its frames go to ``deliver`` (any thread)."""

    def __init__(
        self, config: dict[str, Any], loop: asyncio.AbstractEventLoop, deliver: Any
    ) -> None:
        self.loop = loop
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.branches = BranchEngine(config, lambda frame: deliver(frame["id"], frame))
        self.ready: asyncio.Future = loop.create_future()
        self.thread = threading.Thread(target=self._run, name="thaw-ray-engine", daemon=True)
        self.thread.start()

    def _resolve(self, future: asyncio.Future, value: Any, error: bool = False) -> None:
        def settle() -> None:
            if not future.done():
                (future.set_exception if error else future.set_result)(value)

        self.loop.call_soon_threadsafe(settle)

    def _run(self) -> None:
        try:
            self._resolve(self.ready, self.branches.start())
        except BaseException as exc:  # noqa: BLE001 - reported to the pool by start_engine
            self._resolve(self.ready, RuntimeError(f"{type(exc).__name__}: {exc}"), error=True)
            return
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - a dead engine must not look alive: end the actor
            traceback.print_exc()  # (Ray keeps the actor's log) -> the pool sees ActorDiedError,
            sys.stderr.flush()  # replaces the actor and re-sends its branches
            os._exit(1)

    def _serve(self) -> None:
        while True:
            # Busy: take what arrived and step. Idle: sleep until the next command.
            command = self._next() if self.branches.busy else self.inbox.get()
            while command is not None:
                if command[0] == "stop":
                    return
                self._handle(command)
                command = self._next()
            if self.branches.busy:
                self.branches.step()

    def _next(self) -> tuple | None:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, command: tuple) -> None:
        kind, request_id = command[0], command[1]
        if kind == "abort":
            self.branches.abort(request_id)
        elif kind == "add":
            self.branches.add(request_id, command[2])
        elif kind == "call":  # a function of the BranchEngine, between two steps (weights)
            future, function = command[2], command[3]
            try:
                self._resolve(future, function(self.branches))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._resolve(future, exc, error=True)


class EngineActor:
    """A warm vLLM engine with the ThawConnector, serving branch requests for a RayForkPool."""

    def __init__(self, environment: dict[str, str]) -> None:
        os.environ.update(environment)  # before vLLM / torch are imported in this process
        self._engine: _EngineThread | None = None
        self._queues: dict[str, asyncio.Queue] = {}

    def info(self) -> str:
        """JSON: this actor's Ray node id, pid (its start time and pid space) and accelerator
        ids."""
        import ray

        context = ray.get_runtime_context()
        return json.dumps(
            {
                "node_id": context.get_node_id(),
                "pid": os.getpid(),
                "start_ticks": process_start_ticks(os.getpid()),
                "pid_space": pid_space(),
                "accelerators": context.get_accelerator_ids(),
            }
        )

    async def start_engine(self, config_json: str) -> str:
        """Start the engine on its own thread from the pool's config JSON and wait until it is
        ready; returns the ready frame as JSON (pid, namespace_key, block_size, startup_s) or
        raises RuntimeError naming why it failed."""
        from thaw_agents_core.util.compat import configure_vllm_environment

        configure_vllm_environment()
        loop = asyncio.get_running_loop()
        self._engine = _EngineThread(json.loads(config_json), loop, self._deliver_threadsafe)
        return json.dumps(await self._engine.ready)

    def _deliver_threadsafe(self, request_id: str, frame: dict[str, Any]) -> None:
        assert self._engine is not None
        self._engine.loop.call_soon_threadsafe(self._deliver, request_id, frame)

    def _deliver(self, request_id: str, frame: dict[str, Any]) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(frame)

    async def generate(self, request_json: str):
        """Frames of one request: coalesced deltas (when streamed), then done or error."""
        if self._engine is None:
            raise RuntimeError("start_engine() was not called")
        message = json.loads(request_json)
        request_id = message["id"]
        frames: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = frames
        self._engine.inbox.put(("add", request_id, message))
        finished = False
        try:
            while not finished:
                batch = [await frames.get()]
                while not frames.empty():  # whatever else arrived meanwhile: one frame
                    batch.append(frames.get_nowait())
                text = "".join(f["text"] for f in batch if f["type"] == "delta")
                if text:
                    yield json.dumps({"type": "delta", "id": request_id, "text": text})
                for frame in batch:
                    if frame["type"] in ("done", "error"):
                        finished = True
                        yield json.dumps(frame)
                        break
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._engine.inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request in the engine and end its ``generate`` stream with an error frame."""
        if self._engine is not None:
            self._engine.inbox.put(("abort", request_id))
        self._deliver(request_id, {"type": "error", "id": request_id, "message": "aborted"})

    async def ping(self) -> str:
        """JSON pong frame with the number of running requests (the pool's liveness check)."""
        running = len(self._engine.branches.requests) if self._engine is not None else 0
        return json.dumps({"type": "pong", "num_running": running})

    async def _call(self, function: Any) -> Any:
        """Run ``function(branch_engine)`` on the engine thread, between two steps."""
        if self._engine is None:
            raise RuntimeError("start_engine() was not called")
        future = asyncio.get_running_loop().create_future()
        self._engine.inbox.put(("call", "", future, function))
        return await future

    async def load_weights(self, source_json: str) -> str:
        """Hot swap between two engine steps (BranchEngine.load_weights); the new namespace
        key and the load's stats, as JSON."""
        source = json.loads(source_json)
        reply = await self._call(
            lambda branches: branches.load_weights(source["source"], source["weights_version"])
        )
        return json.dumps(reply)

    async def shutdown(self) -> None:
        """Stop the engine thread (requests in flight are dropped) and free the engine."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        engine.inbox.put(("stop", ""))
        await asyncio.to_thread(engine.thread.join, 30.0)
        engine.branches.engine = None


# ---------------------------------------------------------------------- driver-side helpers


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("RayForkPool needs Ray: pip install 'thaw-agents[ray]' (or ray)") from exc
    return ray


def create_engine_actor(
    name: str,
    placement_group: Any,
    bundle_index: int,
    resources: dict[str, float],
    environment: dict[str, str],
) -> Any:
    """A new EngineActor (no engine yet) in bundle ``bundle_index`` of ``placement_group``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = import_ray()
    custom = dict(resources)
    cpus, gpus = custom.pop("CPU", 0.0), custom.pop("GPU", 0.0)
    return (
        ray.remote(EngineActor)
        .options(
            name=name,
            num_cpus=cpus,
            num_gpus=gpus,
            resources=custom,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, bundle_index),
        )
        .remote(environment)
    )


def spec_on_store(spec: Any, store_url: str) -> Any:
    """The ``EngineSpec`` ``spec`` with its connector pointed at ``store_url`` (a node's arena)."""
    import dataclasses

    config = json.loads(spec.kv_transfer_json or "{}")
    config["kv_connector_extra_config"] = {
        **config["kv_connector_extra_config"],
        "store": store_url,
    }
    return dataclasses.replace(spec, kv_transfer_json=json.dumps(config, sort_keys=True))


def kill_actor(actor: Any) -> None:
    """``ray.kill`` (no restart); nothing when it is gone already."""
    if actor is None:
        return
    try:
        import_ray().kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead, or Ray is gone
        pass


async def settle(ref: Any) -> None:
    """Await ``ref``, ignoring its failure (a dead actor needs no graceful stop)."""
    try:
        await ref
    except Exception:  # noqa: BLE001
        pass


def named_actors(prefix: str) -> list[str]:
    """Names of the live actors Ray lists under ``prefix-`` (every namespace)."""
    try:
        names = import_ray().util.list_named_actors(all_namespaces=True)
    except Exception:  # noqa: BLE001 - Ray is gone: nothing of ours is listed
        return []
    return [n["name"] for n in names if n["name"].startswith(prefix + "-")]
