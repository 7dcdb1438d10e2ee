"""fork_fanout on real vLLM engines: every branch starts from the prefix's KV and is exact.

One parent ChatThaw (float32 tiny Llama, multi-process AsyncLLM, its own shared-memory store)
and one 2-worker ForkPool serve the whole module. The reference for correctness is a FRESH
engine in another process (fanout_procs.py ``reference``, next to this file) with no connector
and no prefix cache, computing each branch's full prompt from its first token: float32 greedy
tokens are bit-exact across processes and batch shapes, so a branch that started from the wrong
KV would differ. The prefix is ~2400 tokens (19 KV blocks of 128).

Durable handles: a prefix snapshot saved to a directory and to ``s3://`` (moto's server over
real HTTP) is hydrated by other processes with their own engines and stores.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fanout_procs import BLOCK, PREFIX_TEXT, SUFFIXES, Reference, parent_model, running
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from moto_s3 import moto_s3

from thaw_agents import fork_fanout, fork_fanout_sync
from thaw_agents.fanout import branch_prompt
from thaw_agents_core.store.shm import ShmStore

HERE = Path(__file__).parent

pytestmark = pytest.mark.slow  # engines: ~40 s to start the parent and its pool

STORE = f"fanout-{os.getpid()}"
PREFIX = [SystemMessage(PREFIX_TEXT)]
MAX_TOKENS = 16  # the model's default in chat_model()


# ---------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def reference():
    ref = Reference()  # starts now, alongside the parent engine
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def events_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv-events") / "events.jsonl"


@pytest.fixture(scope="module")
def llm(events_path):
    with parent_model(STORE, kv_events_path=str(events_path)) as model:
        yield model


@pytest.fixture(scope="module")
def pool(llm):
    workers = llm.fork_pool(2)
    pids = workers.worker_pids()
    yield workers
    workers.close()
    assert workers.alive_workers() == []
    assert not [pid for pid in pids if running(pid)], "a pool worker outlived close()"


def prefix_ids(llm, prefix=PREFIX) -> list[int]:
    return llm.render_prefix(prefix).token_ids


def full_block_tokens(llm, prefix=PREFIX) -> int:
    return len(prefix_ids(llm, prefix)) // BLOCK * BLOCK


def prompts_of(llm, suffixes, prefix=PREFIX) -> list[list[int]]:
    """The full prompt of each branch, built the way fork_fanout builds it."""
    rendered = llm.render_prefix(prefix)
    return [
        branch_prompt(llm.engine.tokenizer, rendered, prefix, [HumanMessage(s)]) for s in suffixes
    ]


def check_exact(results, expected, prompts, cached_at_least: int) -> None:
    """Each branch: no error, the prefix's full blocks reused, tokens equal the fresh run's."""
    assert len(results) == len(expected) == len(prompts)
    for result, reference, prompt in zip(results, expected, prompts):
        assert result.ok, result.error
        assert reference["cached"] == 0  # the reference computed everything itself
        assert result.usage["input_tokens"] == len(prompt)
        assert result.usage["input_token_details"]["cache_read"] >= cached_at_least, result.engine
        assert result.token_ids == reference["tokens"], (result.index, result.engine)
        assert result.usage["output_tokens"] == len(result.token_ids)


def check_timings_and_json(results) -> None:
    for result in results:
        ttft, total = result.timings["ttft_s"], result.timings["total_s"]
        assert ttft is not None and 0 < ttft <= total
        data = result.to_dict()
        assert json.loads(json.dumps(data)) == data


# ---------------------------------------------------------------------- branches


@pytest.mark.parametrize("route", ["pool", "auto", "parent"])
async def test_branches_reuse_the_prefix_and_match_a_fresh_engine(
    llm, pool, reference, events_path, route
):
    # "pool" runs first: its workers have never seen the prefix, so their cache_read can only
    # come from loading the parent's snapshot.
    results = await fork_fanout(llm, PREFIX, SUFFIXES, pool=pool, route=route)
    prompts = prompts_of(llm, SUFFIXES)
    expected = reference.greedy(prompts, MAX_TOKENS)
    assert len(prefix_ids(llm)) >= 2000
    full = full_block_tokens(llm)
    check_exact(results, expected, prompts, full)
    assert len({tuple(e["tokens"]) for e in expected}) == len(SUFFIXES)  # the branches differ
    assert [r.suffix_index for r in results] == list(range(len(SUFFIXES)))
    assert all(r.finish_reason == "length" and r.retries == 0 for r in results)
    handle = results[0].prefix
    assert handle is not None and handle.num_snapshot_tokens == full
    assert handle.prefix_token_ids == prefix_ids(llm)
    check_timings_and_json(results)

    engines = [r.engine for r in results]
    if route == "pool":
        assert sorted(set(engines)) == ["worker-0", "worker-1"]
        events = [json.loads(line) for line in events_path.read_text().splitlines()]
        loads = [
            e for e in events if e["event"] == "load" and e["snapshot_id"] == handle.snapshot_id
        ]
        assert {e["pid"] for e in loads} == set(pool.worker_pids())
        assert all(e["num_blocks"] == full // BLOCK for e in loads)
    elif route == "parent":
        assert set(engines) == {"parent"}
    else:  # the parent takes a share, the idle workers the rest
        assert "parent" in engines and any(e.startswith("worker-") for e in engines)


@pytest.mark.parametrize("route", ["pool", "parent"])
async def test_per_branch_options_are_honoured(llm, pool, reference, route):
    prompts = prompts_of(llm, SUFFIXES)
    expected = [e["tokens"] for e in reference.greedy(prompts, MAX_TOKENS)]
    # A stop string: the first printable character of branch 2's reply past its first token.
    tokenizer = llm.engine.tokenizer
    pieces = [tokenizer.decode([t]) for t in expected[2]]
    cut = next(
        i
        for i, piece in enumerate(pieces)
        if i > 0
        and len(piece) == 1
        and piece.isascii()
        and piece.isprintable()
        and not piece.isspace()
        and piece not in "".join(pieces[:i])
    )
    stop = pieces[cut]
    forced = 65  # logit_bias +100 on one token: every generated token is that one
    options = [
        {"max_tokens": 3},
        {"max_tokens": 9},
        {"stop": [stop]},
        {"logit_bias": {forced: 100.0}, "max_tokens": 5},
    ]
    results = await fork_fanout(llm, PREFIX, SUFFIXES, options=options, pool=pool, route=route)
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].token_ids == expected[0][:3] and results[0].finish_reason == "length"
    assert results[1].token_ids == expected[1][:9] and results[1].finish_reason == "length"
    assert results[2].finish_reason == "stop"
    assert results[2].token_ids == expected[2][: cut + 1]  # generation stopped at the stop string
    assert stop not in results[2].text
    assert results[3].token_ids == [forced] * 5


async def test_n_samples_with_a_seed_are_distinct_and_reproducible(llm, pool):
    options = {"temperature": 1.0, "seed": 1234}
    first = await fork_fanout(
        llm, PREFIX, SUFFIXES[:2], n=3, options=options, pool=pool, route="pool"
    )
    assert [(r.suffix_index, r.sample_index) for r in first] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert all(r.ok and len(r.token_ids) == MAX_TOKENS for r in first)
    for suffix_index in (0, 1):
        samples = {tuple(r.token_ids) for r in first if r.suffix_index == suffix_index}
        assert len(samples) == 3, "n samples with one seed must differ (sample k: seed + k)"
    # Reproducible, in another engine too (the parent instead of the workers) ...
    again = await fork_fanout(
        llm, PREFIX, SUFFIXES[:2], n=3, options=options, pool=pool, route="parent"
    )
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    # ... and sample k is exactly a single request with seed + k.
    second = await fork_fanout(
        llm, PREFIX, SUFFIXES[:2], options={**options, "seed": 1236}, pool=pool, route="pool"
    )
    assert [r.token_ids for r in second] == [first[2].token_ids, first[5].token_ids]


@pytest.mark.parametrize("route", ["pool", "parent"])
async def test_a_failed_branch_is_reported_and_the_others_kept(llm, pool, reference, route):
    # vLLM rejects a logit_bias on a token outside the vocabulary (259 tokens) when the
    # request reaches the engine; our own option checks let it through.
    options = [{}, {"logit_bias": {100000: 1.0}}, {}, {}]
    results = await fork_fanout(llm, PREFIX, SUFFIXES, options=options, pool=pool, route=route)
    bad = results[1]
    assert not bad.ok and "100000" in bad.error and "logit_bias" in bad.error
    assert bad.token_ids == [] and bad.usage["output_tokens"] == 0
    keep = [0, 2, 3]
    prompts = prompts_of(llm, [SUFFIXES[i] for i in keep])
    check_exact(
        [results[i] for i in keep],
        reference.greedy(prompts, MAX_TOKENS),
        prompts,
        full_block_tokens(llm),
    )
    assert json.loads(json.dumps(bad.to_dict()))["error"] == bad.error
    if route == "pool":  # the worker that refused the request still serves
        assert len(pool.alive_workers()) == 2 and pool.replacements == 0


async def test_fork_of_a_fork_reuses_the_cache(llm, pool, reference):
    (first,) = await fork_fanout(llm, PREFIX, [SUFFIXES[0]], pool=pool, route="pool")
    prefix2 = first.messages  # prefix + suffix + reply: the next fanout's prefix
    assert isinstance(prefix2[-1], AIMessage) and prefix2[-1].content == first.text
    second = await fork_fanout(llm, prefix2, SUFFIXES[1:3], pool=pool, route="pool")
    ids2 = prefix_ids(llm, prefix2)
    assert ids2[: len(prefix_ids(llm))] == prefix_ids(llm)  # it extends the first prefix
    full2 = full_block_tokens(llm, prefix2)
    assert full2 > full_block_tokens(llm)
    assert all(r.prefix.num_snapshot_tokens == full2 for r in second)
    prompts = prompts_of(llm, SUFFIXES[1:3], prefix=prefix2)
    check_exact(second, reference.greedy(prompts, MAX_TOKENS), prompts, full2)
    # and a third level, from the second's first branch
    third = await fork_fanout(llm, second[0].messages, [SUFFIXES[3]], pool=pool, route="auto")
    prompts = prompts_of(llm, [SUFFIXES[3]], prefix=second[0].messages)
    check_exact(
        third,
        reference.greedy(prompts, MAX_TOKENS),
        prompts,
        full_block_tokens(llm, second[0].messages),
    )


def test_fork_fanout_sync_from_plain_code(llm, pool, reference):
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    results = fork_fanout_sync(llm, PREFIX, SUFFIXES[:2], pool=pool, route="pool")
    prompts = prompts_of(llm, SUFFIXES[:2])
    check_exact(results, reference.greedy(prompts, MAX_TOKENS), prompts, full_block_tokens(llm))
    check_timings_and_json(results)


async def test_fork_fanout_sync_inside_a_running_loop(llm, pool, reference):
    asyncio.get_running_loop()  # as in Jupyter: a loop is running in this thread
    results = fork_fanout_sync(llm, PREFIX, SUFFIXES[2:], pool=pool, route="auto")
    prompts = prompts_of(llm, SUFFIXES[2:])
    check_exact(results, reference.greedy(prompts, MAX_TOKENS), prompts, full_block_tokens(llm))


async def test_no_request_left_behind(llm, pool):
    """After the fanouts above (timeouts, failures included): nothing runs anywhere."""
    assert llm.engine.llm.get_num_unfinished_requests() == 0
    assert pool.load() == {0: 0, 1: 0}


# ---------------------------------------------------------------------- durable handles

BUCKET = "thaw-handles"


@pytest.fixture(scope="module")
def s3_endpoint():
    """The endpoint is in the environment: the hydrating processes inherit it."""
    with moto_s3(BUCKET, endpoint_in_env=True) as url:
        yield url


def _hydrate(src: str, store: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "fanout_procs.py"),
            "hydrate",
            src,
            store,
            json.dumps(SUFFIXES),
        ],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _lines(proc: subprocess.Popen, timeout_s: float = 400) -> tuple[dict, list[dict]]:
    out, err = proc.communicate(timeout=timeout_s)
    handle = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("HANDLE ")]
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not handle or len(results) != len(SUFFIXES):
        raise AssertionError(f"hydrate failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    return handle[0], results


def test_saved_handle_hydrates_in_other_processes(llm, reference, s3_endpoint, tmp_path):
    # A longer prefix that starts with PREFIX's blocks is in the store first: PREFIX's handle
    # must still name (and save) exactly PREFIX's blocks, not that longer snapshot.
    longer = llm.snapshot([*PREFIX, HumanMessage("y" * 300)])
    handle = llm.snapshot(PREFIX)
    assert longer.num_snapshot_tokens > handle.num_snapshot_tokens == full_block_tokens(llm)
    assert handle.snapshot_id != longer.snapshot_id
    (tmp_path / "handles").mkdir()
    path = handle.save(tmp_path / "handles")  # a directory: <snapshot_id>.thawkv in it
    assert Path(path).is_file() and path.endswith(f"{handle.snapshot_id}.thawkv")
    url = handle.save(f"s3://{BUCKET}/prefixes/{handle.snapshot_id}.thawkv")
    original = fork_fanout_sync(llm, handle, SUFFIXES)  # this process, its own engine
    prompts = prompts_of(llm, SUFFIXES)
    check_exact(
        original, reference.greedy(prompts, MAX_TOKENS), prompts, handle.num_snapshot_tokens
    )

    # Two other processes at once, each with its own engine and its own, empty store.
    shm_name = f"hydrate-{os.getpid()}"
    dir_store = str(tmp_path / "hydrate-store")
    from_file = _hydrate(path, f"shm://{shm_name}?capacity=64MiB")
    from_s3 = _hydrate(url, dir_store)
    try:
        for proc, store in ((from_file, f"shm://{shm_name}?capacity=64MiB"), (from_s3, dir_store)):
            hydrated, results = _lines(proc)
            assert hydrated["store"] == store and hydrated["snapshot_id"] == handle.snapshot_id
            assert hydrated["num_snapshot_tokens"] == handle.num_snapshot_tokens
            for mine, theirs in zip(original, results):
                assert theirs["error"] is None
                assert theirs["engine"] == "parent"  # the other process's own engine
                cached = theirs["usage"]["input_token_details"]["cache_read"]
                assert cached >= handle.num_snapshot_tokens
                assert theirs["token_ids"] == mine.token_ids
    finally:
        for proc in (from_file, from_s3):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ShmStore.unlink(shm_name)  # only does anything if that process died before its close()
    assert not os.path.exists(f"/dev/shm/thaw-{shm_name}")
