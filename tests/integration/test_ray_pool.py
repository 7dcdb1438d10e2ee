"""RayForkPool on a real multi-node Ray cluster on this machine.

The module starts its own cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes,
each a raylet with its own object store, one CPU, and a ``thaw_worker`` resource only on the
workers) and stops it at the end; the pool joins it with ``address=``. Every Ray worker is a
"remote" node: its own plasma store and its own shared-memory arena (NodeStore), so a branch
that reports the prefix as cached loaded a copy that travelled there. Correctness: the branches'
greedy tokens equal a fresh engine's (fanout_procs ``reference``: no connector, no prefix cache)
on the float32 tiny Llama. Faults: an actor SIGKILLed mid-fork and a node removed mid-fork
(every branch still returns, the pool gets its worker back). Nothing may be left behind: no
actor of the pool, no raylet or Ray worker process, no /dev/shm arena.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
import ray
from fanout_procs import BLOCK, PREFIX_TEXT, SUFFIXES, Reference, parent_model, running
from langchain_core.messages import HumanMessage, SystemMessage
from ray.cluster_utils import Cluster

from thaw_agents import fork_fanout
from thaw_agents.fanout import branch_prompt
from thaw_agents_core.pool.ray_pool import RayForkPool

pytestmark = pytest.mark.slow

STORE = f"raypool-{os.getpid()}"
PREFIX = [SystemMessage(PREFIX_TEXT)]
OTHER_PREFIX = [SystemMessage(PREFIX_TEXT.replace("blue", "grey"))]
MAX_TOKENS = 16  # the model's default in chat_model()
NODE = {"num_cpus": 1, "object_store_memory": 100 << 20, "include_dashboard": False}
WORKER = {**NODE, "resources": {"thaw_worker": 1}}
# Ray notices a dead raylet within ~3 s instead of ~30 s.
FAST_HEALTH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


async def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.2)


def _thaw_shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("thaw-", ".thaw-"))}


# ---------------------------------------------------------------------- fixtures


def ray_processes() -> list[psutil.Process]:
    """This process's descendants that belong to Ray (raylets, GCS, agents, workers, actors)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            line = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if line.startswith("ray::") or "/ray/" in line:
            found.append(process)
    return found


@pytest.fixture(scope="module")
def cluster():
    shm_before = _thaw_shm()
    began = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "_system_config": FAST_HEALTH})
    seen: dict[int, psutil.Process] = {}
    try:
        for _ in range(2):
            cluster.add_node(**WORKER)
        cluster.wait_for_nodes(timeout=60)
        assert time.monotonic() - began < 120
        cluster.remember = lambda: seen.update((p.pid, p) for p in ray_processes())
        cluster.remember()
        yield cluster
        cluster.remember()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    deadline = time.monotonic() + 30
    while (
        left := [p for p in seen.values() if running(p.pid) and p.is_running()]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes left after the cluster's shutdown: {left}"
    assert _thaw_shm() <= shm_before, "a /dev/shm arena outlived the cluster"


@pytest.fixture(scope="module")
def reference():
    ref = Reference()  # starts now, alongside the parent engine
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def llm(cluster):  # after the cluster: its teardown then sees the parent's store gone
    with parent_model(STORE) as model:
        yield model
        assert model.engine.num_restarts == 0


@pytest.fixture(scope="module")
def pool(cluster, llm):
    workers = RayForkPool(
        llm.engine_spec(),
        2,
        address=cluster.address,
        resources_per_worker={"thaw_worker": 1},
        node_store_bytes=64 << 20,
        start_timeout_s=240,
        ping_interval_s=1.0,
        ping_timeout_s=30,
        expected_namespace_key=llm.kv_namespace().key(),
    )
    workers.start()
    cluster.remember()
    pids = set(workers.worker_pids())
    yield workers
    pids |= set(workers.worker_pids())  # replacements included
    cluster.remember()
    workers.close()
    assert workers.alive_workers() == [] and not ray.is_initialized()  # it joined, it left
    assert not [pid for pid in pids if running(pid)], "a Ray worker outlived close()"
    assert not [n for n in _thaw_shm() if workers.name in n], "a node arena outlived close()"
    ray.init(address=cluster.address, log_to_driver=False)
    try:  # Ray itself lists none of the pool's actors
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        assert not [n for n in names if n.startswith(workers.name)], names
    finally:
        ray.shutdown()


def prompts_of(llm, suffixes, prefix=PREFIX) -> list[list[int]]:
    """The full prompt of each branch, built the way fork_fanout builds it."""
    rendered = llm.render_prefix(prefix)
    return [
        branch_prompt(llm.engine.tokenizer, rendered, prefix, [HumanMessage(s)]) for s in suffixes
    ]


def full_blocks(llm, prefix=PREFIX) -> int:
    return len(llm.render_prefix(prefix).token_ids) // BLOCK * BLOCK


def check_exact(results, expected, cached_at_least: int) -> None:
    assert len(results) == len(expected)
    for result, reference in zip(results, expected):
        assert result.ok, result.error
        assert reference["cached"] == 0
        assert result.usage["input_token_details"]["cache_read"] >= cached_at_least, result.engine
        assert result.token_ids == reference["tokens"], (result.index, result.engine)


def worker_node_ids(cluster) -> set[str]:
    return {n.node_id for n in cluster.worker_nodes}


# ---------------------------------------------------------------------- branches


async def test_remote_branches_load_the_prefix_and_match_a_fresh_engine(
    llm, pool, cluster, reference, tmp_path
):
    assert pool.num_workers == 2 and pool.alive_workers() == [0, 1]
    nodes = pool.worker_nodes()
    assert len(set(nodes)) == 2 and set(nodes) == worker_node_ids(cluster)  # not the head
    assert all(running(pid) for pid in pool.worker_pids())

    # 1. through Ray's object store (the default): one copy per node, verified on arrival
    results = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route="pool")
    check_exact(results, reference.greedy(prompts_of(llm, SUFFIXES), MAX_TOKENS), full_blocks(llm))
    assert {r.engine for r in results} == {"worker-0", "worker-1"}
    handle = results[0].prefix
    copies = [t for t in pool.transfers if t["snapshot_id"] == handle.snapshot_id]
    assert sorted(t["node_id"] for t in copies) == sorted(nodes)
    assert all(t["transport"] == "object_store" and not t["cached"] for t in copies)

    # 2. through a shared directory, for another prefix (the first one is on the nodes already)
    pool.snapshot_transport = str(tmp_path / "shared")
    other = await fork_fanout(llm, OTHER_PREFIX, SUFFIXES[:2], pool=pool, route="pool")
    check_exact(
        other,
        reference.greedy(prompts_of(llm, SUFFIXES[:2], OTHER_PREFIX), MAX_TOKENS),
        full_blocks(llm, OTHER_PREFIX),
    )
    handle = other[0].prefix
    assert (tmp_path / "shared" / handle.namespace_key / f"{handle.snapshot_id}.thawkv").is_file()
    copies = [t for t in pool.transfers if t["snapshot_id"] == handle.snapshot_id]
    assert len(copies) == len({r.engine for r in other}) and all(
        t["transport"] == "shared" for t in copies
    )

    # 3. the same round again: nothing is copied twice, "auto" routing counts the Ray workers
    count = len(pool.transfers)
    again = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route="auto")
    check_exact(again, reference.greedy(prompts_of(llm, SUFFIXES), MAX_TOKENS), full_blocks(llm))
    assert {r.engine for r in again} >= {"parent", "worker-0", "worker-1"}
    assert len(pool.transfers) == count
    pool.snapshot_transport = "object_store"


# ---------------------------------------------------------------------- faults


async def _fork_with_fault(llm, pool, fault) -> list:
    """A long fork on the pool; ``fault()`` runs once, when the first token arrives."""
    done: list[bool] = []

    def on_token(branch: int, text: str) -> None:
        if not done:
            done.append(True)
            fault()

    results = await fork_fanout(
        llm,
        PREFIX,
        SUFFIXES,
        pool=pool,
        route="pool",
        on_token=on_token,
        options={"max_tokens": 300, "ignore_eos": True},
    )
    assert done
    return results


async def check_fault_results(llm, pool, results) -> None:
    assert [r.error for r in results] == [None] * len(SUFFIXES)
    assert all(len(r.token_ids) == 300 for r in results)
    assert any(r.retries >= 1 for r in results), "no branch was on the lost worker"
    assert all(r.usage["input_token_details"]["cache_read"] >= full_blocks(llm) for r in results)
    clean = await fork_fanout(
        llm, PREFIX, SUFFIXES, route="parent", options={"max_tokens": 300, "ignore_eos": True}
    )
    assert [r.token_ids for r in results] == [r.token_ids for r in clean]


async def test_actor_killed_mid_fork_is_retried_and_replaced(llm, pool):
    replacements, victim = pool.replacements, pool.worker_pids()[0]
    results = await _fork_with_fault(llm, pool, lambda: os.kill(victim, signal.SIGKILL))
    assert not running(victim)
    await check_fault_results(llm, pool, results)
    await _wait_for(lambda: len(pool.alive_workers()) == 2, 240, "the killed actor replaced")
    assert pool.replacements == replacements + 1 and victim not in pool.worker_pids()


async def test_node_removed_mid_fork_is_retried_and_replaced_on_a_new_node(llm, pool, cluster):
    await _wait_for(lambda: len(pool.alive_workers()) == 2, 240, "both workers alive")
    node_id = pool.worker_nodes()[1]
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    victim = pool.worker_pids()[1]
    results = await _fork_with_fault(llm, pool, lambda: cluster.remove_node(node))
    assert not running(victim)
    await check_fault_results(llm, pool, results)

    # its bundle moves to a new node once there is one; branches there load the prefix again
    new = cluster.add_node(**WORKER)
    await _wait_for(lambda: len(pool.alive_workers()) == 2, 240, "a worker on the new node")
    assert new.node_id in pool.worker_nodes() and node_id not in pool.worker_nodes()
    cluster.remember()
    again = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route="pool")
    assert all(r.ok for r in again) and {r.engine for r in again} == {"worker-0", "worker-1"}
    assert all(r.usage["input_token_details"]["cache_read"] >= full_blocks(llm) for r in again)
    assert any(t["node_id"] == new.node_id for t in pool.transfers)


async def test_request_timeout_aborts_and_the_actor_keeps_serving(llm, pool):
    from thaw_agents_core.engine.sampling import GenerationOptions

    await _wait_for(lambda: len(pool.alive_workers()) == 2, 240, "both workers alive")
    pids, prompt = pool.worker_pids(), llm.render_prefix(PREFIX).token_ids
    long = GenerationOptions(max_tokens=1300, ignore_eos=True, temperature=0.0)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="exceeded its timeout on worker 0"):
        await pool.generate(prompt, long, worker=0, timeout_s=0.5)
    assert time.monotonic() - began < 10
    short = await pool.generate(prompt, GenerationOptions(max_tokens=4, temperature=0.0), worker=0)
    assert short.engine == "worker-0" and len(short.token_ids) == 4
    await _wait_for(lambda: pool.load() == {0: 0, 1: 0}, 10, "no request left in the pool")
    assert pool.worker_pids() == pids


# ---------------------------------------------------------------------- weights (last: swaps)


async def test_load_weights_reaches_every_actor_and_fences_the_namespace(llm, pool, tmp_path):
    from thaw_agents_core.engine.models import tiny_model_path
    from thaw_agents_core.weights.freeze import freeze_safetensors

    await _wait_for(lambda: len(pool.alive_workers()) == 2, 240, "both workers alive")
    before = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route="pool")
    weights_b = tmp_path / "B.thaw"
    freeze_safetensors(tiny_model_path(seed=1), weights_b, weights_version="B")
    key_a = pool.expected_namespace_key
    await asyncio.to_thread(llm.load_weights, weights_b, "B-1")
    assert await asyncio.to_thread(pool.load_weights, weights_b, "B-1") == "B-1"
    assert pool.weights_version == "B-1" and pool.expected_namespace_key != key_a
    assert pool.expected_namespace_key == llm.kv_namespace().key()

    # a new snapshot under B reaches the nodes; the branches equal the parent's own, on B
    results = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route="pool")
    parent = await fork_fanout(llm, PREFIX, SUFFIXES, route="parent")
    assert [r.error for r in results] == [None] * len(SUFFIXES)
    assert {r.route["weights_version"] for r in results} == {"B-1"}
    assert all(r.usage["input_token_details"]["cache_read"] >= full_blocks(llm) for r in results)
    assert [r.token_ids for r in results] == [r.token_ids for r in parent]
    assert [r.token_ids for r in results] != [r.token_ids for r in before]
    assert results[0].prefix.namespace_key != before[0].prefix.namespace_key
