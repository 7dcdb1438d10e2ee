"""ForkPool: lifecycle and faults on real vLLM engines.

(The wire framing between the pool and its workers: tests/unit/test_pool_wire.py.)

Engines: one parent ChatThaw (float32 tiny Llama, its own shared-memory store) and one 2-worker
pool for the module. Faults: a worker SIGKILLed in the middle of a fanout (every branch still
returns, the pool gets its worker back), a request timeout (the worker keeps serving), close()
and ``with`` (no worker left), and the parent itself SIGKILLed (no process of it left behind).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from fanout_procs import BLOCK, PREFIX_TEXT, SUFFIXES, parent_model, running
from langchain_core.messages import SystemMessage

from thaw_agents import ForkPool, fork_fanout
from thaw_agents_core.engine.sampling import GenerationOptions
from thaw_agents_core.pool.fork_pool import PoolError
from thaw_agents_core.store.shm import ShmStore

HERE = Path(__file__).parent

STORE = f"pool-{os.getpid()}"
PREFIX = [SystemMessage(PREFIX_TEXT)]


# ---------------------------------------------------------------------- engines


async def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def llm():
    with parent_model(STORE) as model:
        yield model


@pytest.fixture(scope="module")
def pool(llm):
    workers = llm.fork_pool(2)
    pids = set(workers.worker_pids())
    yield workers
    pids |= set(workers.worker_pids())  # replacements included
    workers.close()
    assert not [pid for pid in pids if running(pid)], "a pool worker outlived close()"


@pytest.fixture(scope="module")
def prefix_ids(llm) -> list[int]:
    ids = llm.render_prefix(PREFIX).token_ids
    assert len(ids) >= 2000
    return ids


@pytest.mark.slow
def test_workers_are_ready_with_the_parents_namespace(llm, pool):
    assert pool.num_workers == 2 and pool.alive_workers() == [0, 1]
    pids = pool.worker_pids()
    me = psutil.Process()
    assert len(set(pids)) == 2 and all(running(pid) for pid in pids)
    assert {p.pid for p in me.children()} >= set(pids)
    parent_key = llm.kv_namespace().key()
    assert pool.expected_namespace_key == parent_key
    assert [w.namespace_key for w in pool._workers] == [parent_key, parent_key]
    # one core each (CPU placement), the first core left to the parent's engine when possible
    assert all(len(psutil.Process(pid).cpu_affinity()) == 1 for pid in pids)


@pytest.mark.slow
async def test_killed_worker_mid_fanout_is_retried_and_replaced(llm, pool, prefix_ids):
    options = {"max_tokens": 600, "ignore_eos": True}
    replacements = pool.replacements
    victim: list[int] = []

    def kill_on_first_token(branch: int, text: str) -> None:
        if not victim:  # every branch is in a worker by now: kill one mid-generation
            victim.append(pool.worker_pids()[0])
            os.kill(victim[0], signal.SIGKILL)

    results = await fork_fanout(
        llm,
        PREFIX,
        SUFFIXES,
        options=options,
        pool=pool,
        route="pool",
        on_token=kill_on_first_token,
    )
    assert victim and not running(victim[0])
    assert [r.error for r in results] == [None] * len(SUFFIXES)
    assert all(len(r.token_ids) == 600 and r.finish_reason == "length" for r in results)
    assert any(r.retries >= 1 for r in results), "no branch was running on the killed worker"
    full = len(prefix_ids) // BLOCK * BLOCK
    assert all(r.usage["input_token_details"]["cache_read"] >= full for r in results)
    # the re-sent branches produce exactly what an uninterrupted run produces
    clean = await fork_fanout(llm, PREFIX, SUFFIXES, options=options, pool=pool, route="parent")
    assert [r.token_ids for r in results] == [r.token_ids for r in clean]

    await _wait_for(lambda: len(pool.alive_workers()) == 2, 180, "the killed worker replaced")
    assert pool.replacements == replacements + 1
    assert victim[0] not in pool.worker_pids() and len(set(pool.worker_pids())) == 2
    again = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route="pool")
    assert all(r.ok for r in again) and {r.engine for r in again} == {"worker-0", "worker-1"}
    assert all(r.usage["input_token_details"]["cache_read"] >= full for r in again)


@pytest.mark.slow
async def test_request_timeout_aborts_and_the_worker_keeps_serving(llm, pool, prefix_ids):
    await _wait_for(lambda: len(pool.alive_workers()) == 2, 180, "both workers alive")
    pids, replacements = pool.worker_pids(), pool.replacements
    long = GenerationOptions(max_tokens=1300, ignore_eos=True, temperature=0.0)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="exceeded its timeout on worker 0"):
        await pool.generate(prefix_ids, long, worker=0, timeout_s=0.5)
    assert time.monotonic() - began < 10
    short = await pool.generate(
        prefix_ids, GenerationOptions(max_tokens=4, temperature=0.0), worker=0
    )
    assert short.engine == "worker-0" and len(short.token_ids) == 4
    # the same through fork_fanout: every branch reports the TimeoutError, none is lost
    results = await fork_fanout(
        llm,
        PREFIX,
        SUFFIXES[:2],
        options={"max_tokens": 1300, "ignore_eos": True},
        pool=pool,
        route="pool",
        timeout_s=0.5,
    )
    assert all(r.error and r.error.startswith("TimeoutError") for r in results)
    ok = await fork_fanout(llm, PREFIX, SUFFIXES[:2], pool=pool, route="pool")
    assert all(r.ok for r in ok)
    await _wait_for(lambda: pool.load() == {0: 0, 1: 0}, 10, "no request left in the pool")
    assert pool.worker_pids() == pids and pool.replacements == replacements


@pytest.mark.slow
def test_context_manager_and_close_leave_no_workers(llm, prefix_ids):
    with ForkPool(llm.engine_spec(), 1, expected_namespace_key=llm.kv_namespace().key()) as one:
        (pid,) = one.worker_pids()
        result = asyncio.run(
            one.generate(prefix_ids, GenerationOptions(max_tokens=4, temperature=0.0))
        )
        assert result.engine == "worker-0" and len(result.token_ids) == 4
        assert result.cached_tokens >= len(prefix_ids) // BLOCK * BLOCK  # from the store
    assert not running(pid) and one.alive_workers() == []
    one.close()  # twice is fine
    with pytest.raises(PoolError, match="closed"):
        asyncio.run(one.generate(prefix_ids, GenerationOptions(max_tokens=4)))


# ---------------------------------------------------------------------- parent killed


def _marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ and running(int(entry)):
            pids.append(int(entry))
    return pids


def _alive(tree: list[psutil.Process], marker: str) -> list[str]:
    """The processes of ``tree`` (pid and start time checked) or with ``marker`` still alive."""
    left = {}
    for process in tree:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left[process.pid] = process.name()
        except psutil.NoSuchProcess:
            pass
    for pid in _marked(marker):
        left.setdefault(pid, "(marked)")
    return [f"{pid} {name}" for pid, name in sorted(left.items())]


@pytest.mark.slow
def test_parent_sigkill_leaves_no_orphans(tmp_path):
    """A ChatThaw with a store and a pool, SIGKILLed: within 15 s none of its processes live.

    Two views of "its processes": every process carrying an environment marker set for the
    script (pool workers, multiprocessing helpers), and the script's process tree taken just
    before the kill (vLLM's engine core renames itself with setproctitle, which blanks its
    /proc environ, so only the tree finds it).
    """
    marker = f"THAW_TEST_ORPHAN_{uuid.uuid4().hex}"
    name = f"orphan-{os.getpid()}"
    with open(tmp_path / "orphan.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fanout_procs.py"),
                "orphan",
                f"shm://{name}?capacity=64MiB",
            ],
            text=True,
            env={**os.environ, marker: "1"},
            stdout=subprocess.PIPE,
            stderr=log,
        )
    tree: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        line = next((line for line in proc.stdout if line.startswith("PIDS ")), None)
        assert line is not None, (tmp_path / "orphan.log").read_text()[-4000:]
        pids = json.loads(line[5:])
        assert pids["parent"] == proc.pid and len(pids["workers"]) == 1
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = [p.name() for p in tree]
        assert set(pids["workers"]) <= {p.pid for p in tree}
        assert any("EngineCore" in n for n in names), names
        assert set(_marked(marker)) >= {proc.pid, *pids["workers"]}

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while (left := _alive(tree, marker)) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not left, f"left behind after the parent's SIGKILL: {left}"
    finally:
        for p in tree:  # only this test's processes, by pid (and start time, via psutil)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ShmStore.unlink(name)  # its creator was killed: nobody else removes it
    assert not os.path.exists(f"/dev/shm/thaw-{name}")
