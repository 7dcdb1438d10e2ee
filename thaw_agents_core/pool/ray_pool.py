"""RayForkPool: ForkPool's interface, its workers Ray actors on any node of a Ray cluster.

    driver (this process: the parent engine, its store)        node N of the cluster
    RayForkPool (own event-loop thread)                        NodeStore actor: N's shm arena
      generate(ids, options)                                   EngineActor i (placement-group
        -> longest snapshot of ids in the parent's store          bundle i): LLMEngine +
        -> once per (node, snapshot): stage + ingest              ThawConnector on N's arena
           (ray_transport: object store or a shared store)
        -> least-loaded live actor: generate.remote() --->     streamed JSON frames back

Placement: one placement group, bundle i = ``{"CPU": num_cpus_per_worker, "GPU":
num_gpus_per_worker, **resources_per_worker}`` (CPU platform: one core, no GPU; GPU: one GPU),
spread over nodes by ``placement_strategy``. ``address=`` joins an existing cluster.
``prefetch(handle)`` copies a snapshot to every worker's node ahead of its branches;
``load_weights`` (weights_fence) swaps every actor's weights behind a ``weights_version`` fence;
on other hosts a ``.thaw`` path must name the same file on every node (a shared file system),
and shared-memory or CUDA-IPC sources reach only the driver's host.

Failure handling (every wait has a deadline): an actor or node that dies (a failed call, or no
pong within ``ping_timeout_s``) is replaced in its bundle (Ray moves the bundle of a dead node
when another node has room) and its in-flight requests are re-sent to live actors, at most
``max_retries`` times each; a request past its timeout is aborted in its actor (TimeoutError);
``close()`` stops engines, kills every actor of the pool, removes the placement group and waits
until Ray lists none of its actors and the actor processes it started on this host have exited. Non-detached actors also die with the driver.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.engine.spec import EngineSpec
from thaw_agents_core.pool.base import DeltaCallback, WarmPool
from thaw_agents_core.pool.placement import Placement
from thaw_agents_core.pool.ray_actor import (
    create_engine_actor,
    import_ray,
    kill_actor,
    named_actors,
    settle,
    spec_on_store,
)
from thaw_agents_core.pool.ray_transport import OBJECT_STORE, NodeCopies, check_transport
from thaw_agents_core.pool.weights_fence import PoolError
from thaw_agents_core.util import compat
from thaw_agents_core.util.loop_thread import LoopThread
from thaw_agents_core.util.process_identity import pid_space, reap

logger = logging.getLogger("thaw_agents.pool")


@dataclass(slots=True)
class RayPlacement(Placement):
    """Where one Ray worker runs: its bundle, Ray resources, and (once placed) its node."""

    bundle_index: int = -1
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str = ""


@dataclass
class _Request:
    id: str
    payload: dict[str, Any]
    on_delta: DeltaCallback | None
    snapshot: Any  # store.base.Match of the prompt in the parent's store, or None
    retries: int = 0


@dataclass
class _Slot:
    index: int
    placement: RayPlacement
    actor: Any = None
    generation: int = 0
    alive: bool = False
    pid: int = 0
    namespace_key: str = ""
    pending: dict[str, _Request] = field(default_factory=dict)


class _WorkerLost(Exception):
    """The actor (or its node) died under a request."""


class RayForkPool(WarmPool):
    """N warm vLLM engines as Ray actors; branches load the prefix from their node's store."""

    worker_kind = "Ray"

    def __init__(
        self,
        spec: EngineSpec,
        num_workers: int = 2,
        *,
        address: str | None = None,
        snapshot_transport: str = OBJECT_STORE,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float | None = None,
        resources_per_worker: dict[str, float] | None = None,
        placement_strategy: str = "SPREAD",
        node_store_bytes: int = 1 << 30,
        engine_overrides: dict[str, Any] | None = None,
        worker_env: dict[str, str] | None = None,
        start_timeout_s: float = 900.0,
        request_timeout_s: float | None = None,
        ping_interval_s: float = 5.0,
        ping_timeout_s: float = 60.0,
        max_retries: int = 2,
        expected_namespace_key: str | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        settings = spec.connector_settings
        if settings is None:
            raise ValueError(
                "pool workers load prefixes through ThawConnector: the spec needs "
                "a KV store (ChatThaw(kv_store=...) or kv_transfer=...)"
            )
        if placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"placement_strategy must be PACK, SPREAD, STRICT_PACK or "
                f"STRICT_SPREAD, got {placement_strategy!r}"
            )
        self.spec = spec
        self.address = address
        self._transport = check_transport(snapshot_transport)
        gpus = (
            num_gpus_per_worker
            if num_gpus_per_worker is not None
            else (0.0 if compat.is_cpu_platform() else 1.0)
        )
        bundle = {
            "CPU": float(num_cpus_per_worker),
            **({"GPU": float(gpus)} if gpus else {}),
            **{k: float(v) for k, v in (resources_per_worker or {}).items()},
        }
        self.placements = [
            RayPlacement(bundle_index=i, resources=dict(bundle)) for i in range(num_workers)
        ]
        self.placement_strategy = placement_strategy
        self.node_store_bytes = node_store_bytes
        self.engine_overrides = dict(engine_overrides or {})
        self.environment = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            **({"OMP_NUM_THREADS": str(max(1, int(num_cpus_per_worker)))} if not gpus else {}),
            **(worker_env or {}),
        }
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_retries = max_retries
        self.expected_namespace_key = expected_namespace_key
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self.name = f"thaw-{secrets.token_hex(4)}"
        """Prefix of every Ray actor and placement group of this pool."""
        self.replacements = 0
        self.weights_version = settings.weights_version
        """The weights version every live worker serves (changes with ``load_weights``)."""
        self._swap: asyncio.Future | None = None  # set while load_weights runs: requests wait
        self._last_weights: dict[str, Any] | None = None  # re-applied to replacement workers
        self._workers = [_Slot(i, p) for i, p in enumerate(self.placements)]
        self._block_size = 0
        self._ids = itertools.count()
        self._loop: LoopThread | None = None
        self._owns_ray = False
        self._parent_store: Any = None
        self._copies: NodeCopies | None = None
        self._pg: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._local_processes: list[tuple[int, int]] = []  # (pid, start) of actors on this host
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def worker_pids(self) -> list[int]:
        """Process ids of the live actors (each on its own node's host)."""
        return [s.pid for s in self._workers if s.alive]

    def worker_nodes(self) -> list[str]:
        """Ray node id of each live actor."""
        return [s.placement.node_id for s in self._workers if s.alive]

    @property
    def snapshot_transport(self) -> str:
        """How snapshots reach the nodes: "object_store", a shared directory or s3://...;
        settable (applies to the snapshots sent from then on)."""
        return self._transport

    @snapshot_transport.setter
    def snapshot_transport(self, transport: str) -> None:
        """Set the transport (ValueError for an invalid one; see ``check_transport``)."""
        self._transport = check_transport(transport)
        if self._copies is not None:
            self._copies.transport = self._transport

    @property
    def transfers(self) -> list[dict[str, Any]]:
        """One entry per snapshot copied to a node: node, bytes, stage/copy/verify seconds."""
        return self._copies.transfers if self._copies is not None else []

    def start(self) -> RayForkPool:
        """Join (or start) Ray, place every worker and wait until all are ready (blocking)."""
        if self._closed:
            raise PoolError("the pool is closed: start a new one")
        if self._loop is not None:
            return self
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **{"log_to_driver": False, **self.ray_init_kwargs})
            self._owns_ray = True
        self._track()  # after Ray's own exit hook: runs before it
        from thaw_agents_core.store.url import attach_url, open_store

        self._parent_store = open_store(attach_url(self.spec.connector_settings.store))
        self._copies = NodeCopies(
            self._parent_store,
            self._transport,
            name=self.name,
            capacity_bytes=self.node_store_bytes,
            timeout_s=self.start_timeout_s,
        )
        self._loop = LoopThread("thaw-ray-pool")
        try:
            self._loop.submit(self._start_all()).result()
        except BaseException:
            self.close()
            raise
        return self

    async def _start_all(self) -> None:
        ray = import_ray()
        from ray.util.placement_group import placement_group

        self._pg = placement_group(
            [p.resources for p in self.placements],
            strategy=self.placement_strategy,
            name=f"{self.name}-pg",
        )
        try:
            await asyncio.wait_for(self._pg.ready(), self.start_timeout_s)
        except asyncio.TimeoutError:
            raise PoolError(
                f"Ray could not place {self.num_workers} worker(s) of {self.placements[0].resources}"
                f" ({self.placement_strategy}) within {self.start_timeout_s} s; the cluster has "
                f"{ray.cluster_resources()}, free {ray.available_resources()}"
            ) from None
        await asyncio.gather(*(self._spawn(s) for s in self._workers))
        self._spawn_task(self._watch())

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, slot: _Slot) -> None:
        ray = import_ray()
        slot.generation += 1
        actor = slot.actor = create_engine_actor(  # close() kills it while it waits for a node
            f"{self.name}-w{slot.index}.{slot.generation}",
            self._pg,
            slot.index,
            slot.placement.resources,
            self.environment,
        )
        step = "placed"
        try:
            info = json.loads(await asyncio.wait_for(actor.info.remote(), self.start_timeout_s))
            if info["pid_space"] and info["pid_space"] == pid_space():
                self._local_processes.append((info["pid"], info["start_ticks"]))
            step = "ready"
            assert self._copies is not None
            store = await self._copies.store_of(info["node_id"])
            spec = spec_on_store(self.spec, await store.url.remote())
            config = {"spec": asdict(spec), "engine_overrides": self.engine_overrides}
            ready = json.loads(
                await asyncio.wait_for(
                    actor.start_engine.remote(json.dumps(config)), self.start_timeout_s
                )
            )
            if self._last_weights is not None:  # a replacement after a swap: same weights first
                step = f"on weights {self.weights_version!r}"
                ready.update(
                    await self._swap_worker(slot, self._last_weights, self.start_timeout_s)
                )
        except (asyncio.TimeoutError, ray.exceptions.RayError) as exc:
            kill_actor(actor)
            raise PoolError(
                f"Ray worker {slot.index} was not {step} within "
                f"{self.start_timeout_s} s: {type(exc).__name__}: {exc}"
            ) from None
        if self.expected_namespace_key and ready["namespace_key"] != self.expected_namespace_key:
            kill_actor(actor)
            raise PoolError(
                f"Ray worker {slot.index} has KV namespace {ready['namespace_key']}, "
                f"the parent {self.expected_namespace_key}: same model (at the same "
                "path on every node), dtype and block size are needed"
            )
        self._block_size = ready["block_size"]
        slot.placement.node_id, slot.pid = info["node_id"], ready["pid"]
        slot.namespace_key, slot.pending, slot.alive = ready["namespace_key"], {}, True
        logger.info(
            "thaw: Ray worker %d ready on node %s (pid %d, %.1f s)",
            slot.index,
            info["node_id"][:12],
            ready["pid"],
            ready["startup_s"],
        )

    def _kill_all(self, timeout_s: float) -> None:
        for slot in self._workers:
            slot.alive = False
            kill_actor(slot.actor)
        # Ray lists a killed actor as dead before its process has exited: wait for the ones on
        # this host (SIGKILL after the timeout), so that none outlives close().
        if left := reap(self._local_processes, timeout_s):
            logger.warning("thaw: RayForkPool close: actor processes %s did not exit", left)
        if self._parent_store is not None:
            self._parent_store.close()
        from thaw_agents_core.store.shm import ShmStore

        ShmStore.remove_stale()  # arenas of node stores killed before they could unlink
        if self._owns_ray:
            import_ray().shutdown()

    async def _shutdown(self, timeout_s: float) -> None:
        ray = import_ray()
        deadline = time.monotonic() + timeout_s
        for task in list(self._tasks):
            task.cancel()
        for slot in self._workers:
            slot.alive = False
        stores = self._copies.stores() if self._copies is not None else []
        calls = [s.actor.shutdown.remote() for s in self._workers if s.actor is not None]
        calls += [store.close.remote() for store in stores]
        if calls:
            await asyncio.wait(
                [asyncio.ensure_future(settle(c)) for c in calls],
                timeout=max(1.0, deadline - time.monotonic()) / 2,
            )
        for actor in [s.actor for s in self._workers] + stores:
            kill_actor(actor)
        if self._copies is not None:
            self._copies.clear()
        if self._pg is not None:
            ray.util.remove_placement_group(self._pg)
        while named_actors(self.name) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ requests

    async def _generate(
        self,
        prompt_ids: list[int],
        options: dict[str, Any],
        on_delta: DeltaCallback | None,
        preferred: int | None,
        timeout_s: float | None,
    ) -> GenerationResult:
        payload = {"prompt_ids": prompt_ids, "stream": on_delta is not None, "options": options}
        request = _Request(f"fork-{next(self._ids)}", payload, on_delta, None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            while self._swap is not None:  # hold new requests while weights are swapped
                await asyncio.shield(self._swap)
            request.snapshot = self._lookup(payload["prompt_ids"])  # in the current namespace
            slot = await self._pick(preferred)
            generation = slot.generation
            slot.pending[request.id] = request
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                return await asyncio.wait_for(self._run_on(slot, request), remaining)
            except asyncio.TimeoutError:
                slot.actor.abort.remote(request.id)
                raise TimeoutError(
                    f"branch request {request.id} exceeded its timeout on worker "
                    f"{slot.index}; aborted"
                ) from None
            except asyncio.CancelledError:
                if slot.alive:
                    slot.actor.abort.remote(request.id)
                raise
            except _WorkerLost as lost:
                self._on_death(slot, generation, str(lost))
                if request.retries >= self.max_retries:
                    raise PoolError(
                        f"request {request.id} failed: its worker died "
                        f"{request.retries + 1} times ({lost})"
                    ) from None
                request.retries += 1
                preferred = None
            finally:
                slot.pending.pop(request.id, None)

    async def _run_on(self, slot: _Slot, request: _Request) -> GenerationResult:
        ray = import_ray()
        if request.snapshot is not None:
            assert self._copies is not None
            await self._copies.ensure(slot.placement.node_id, request.snapshot.ref)
        try:
            stream = slot.actor.generate.remote(json.dumps({"id": request.id, **request.payload}))
            async for ref in stream:
                frame = json.loads(await ref)
                if frame["type"] == "delta":
                    if request.on_delta is not None:
                        request.on_delta(frame["text"])
                elif frame["type"] == "error":
                    raise ValueError(frame["message"])
                elif frame["type"] == "done":
                    return self._finished(slot, request, frame["result"])
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
        ) as exc:
            raise _WorkerLost(f"{type(exc).__name__}: {str(exc)[:300]}") from None
        except ray.exceptions.RayTaskError as exc:
            raise PoolError(f"Ray worker {slot.index} failed request {request.id}: {exc}") from None
        raise _WorkerLost("its stream ended without a result")

    def _finished(self, slot: _Slot, request: _Request, wire: dict[str, Any]) -> GenerationResult:
        result = GenerationResult.from_wire(
            wire, engine=f"worker-{slot.index}", retries=request.retries
        )
        result.route.update(weights_version=self.weights_version, node_id=slot.placement.node_id)
        match = request.snapshot
        if match is not None and result.cached_tokens < match.num_blocks * self._block_size:
            # the node's copy was evicted (or never arrived): the next branch re-sends it
            assert self._copies is not None
            self._copies.forget(slot.placement.node_id, match.ref.snapshot_id)
        return result

    def _on_death(self, slot: _Slot, generation: int, reason: str) -> None:
        if slot.generation != generation or not slot.alive:
            return  # already handled (another request saw it first)
        slot.alive = False
        kill_actor(slot.actor)
        if self._closed:
            return
        logger.warning(
            "thaw: Ray worker %d died (%s); replacing it, re-sending %d request(s)",
            slot.index,
            reason,
            len(slot.pending),
        )
        self.replacements += 1
        self._spawn_task(self._replace(slot))

    def _drop_worker(self, slot: _Slot, generation: int, reason: str) -> None:
        self._on_death(slot, generation, reason)

    async def _swap_worker(
        self, slot: _Slot, source: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """load_weights on the slot's actor; its reply (namespace_key, stats)."""
        reply = json.loads(
            await asyncio.wait_for(slot.actor.load_weights.remote(json.dumps(source)), timeout_s)
        )
        slot.namespace_key = reply["namespace_key"]
        return reply

    async def _replace(self, slot: _Slot) -> None:
        try:
            await self._spawn(slot)
        except PoolError as exc:
            logger.error("thaw: could not replace Ray worker %d: %s", slot.index, exc)

    async def _watch(self) -> None:
        """Ping every live actor; one that does not answer in time is replaced."""
        ray = import_ray()
        while not self._closed:
            await asyncio.sleep(self.ping_interval_s)
            live = [(s, s.generation) for s in self._workers if s.alive]
            answers = await asyncio.gather(
                *(asyncio.wait_for(s.actor.ping.remote(), self.ping_timeout_s) for s, _ in live),
                return_exceptions=True,
            )
            for (slot, generation), answer in zip(live, answers):
                if isinstance(answer, (asyncio.TimeoutError, ray.exceptions.RayError)):
                    self._on_death(slot, generation, f"ping: {type(answer).__name__}")

    # ------------------------------------------------------------------ snapshots

    async def prefetch(self, prefix: Any) -> int:
        """Copy the snapshot of ``prefix`` (a PrefixHandle or token ids) to the node of every
        live worker now, ahead of its branches; returns how many nodes hold it."""
        ids = list(getattr(prefix, "prefix_token_ids", prefix))
        if self._loop is None or self._closed:
            raise PoolError("the pool is not running: start() it first")
        return await self._loop.call(self._prefetch(ids))

    async def _prefetch(self, prompt_ids: list[int]) -> int:
        match = self._lookup(prompt_ids)
        if match is None:
            return 0
        assert self._copies is not None
        nodes = {s.placement.node_id for s in self._workers if s.alive}
        return sum(await asyncio.gather(*(self._copies.ensure(n, match.ref) for n in nodes)))

    def _lookup(self, prompt_ids: list[int]) -> Any:
        key = self.expected_namespace_key or next(
            (s.namespace_key for s in self._workers if s.namespace_key), ""
        )
        if not key or not self._block_size or self._copies is None:
            return None
        return self._copies.lookup(prompt_ids, key, self._block_size)
