"""Weights move like KV: .thaw freeze/restore, hot swap of a parent and its pool, KV fencing.

Two float32 tiny Llamas with the same shapes and different weights (seed 0 = A, seed 1 = B).
Engines, shared by the module: the parent ChatThaw (boots A, swapped in place), its 2-worker
ForkPool, a fresh engine loaded the normal way with B (the reference every swap must equal)
and, briefly, a cold start from B's .thaw. Greedy float32 tokens are bit-exact on the CPU, so
any wrong byte in a restore would change them.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from fanout_procs import PREFIX_TEXT, SUFFIXES, chat_model, parent_model
from langchain_core.messages import HumanMessage, SystemMessage

from thaw_agents import fork_fanout
from thaw_agents_core.engine.models import tiny_model_path
from thaw_agents_core.engine.sampling import GenerationOptions
from thaw_agents_core.snapshot.errors import SnapshotMismatchError
from thaw_agents_core.weights.freeze import freeze_safetensors
from thaw_agents_core.weights.io import open_weights

STORE = f"weights-{os.getpid()}"
PREFIX = [SystemMessage(PREFIX_TEXT)]
QUESTIONS = ["hello there", "abcabcabc"]


def _answers(model, prefix=()) -> list[str]:
    return [model.invoke([*prefix, HumanMessage(q)]).content for q in QUESTIONS]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("thaw")
    out = {"A": folder / "A.thaw", "B": folder / "B.thaw", "dir": folder}
    freeze_safetensors(tiny_model_path(seed=0), out["A"], weights_version="A")
    freeze_safetensors(tiny_model_path(seed=1), out["B"], weights_version="B")
    return out


@pytest.fixture(scope="module")
def reference_b():
    """A fresh engine loaded the normal way with B: what every swap to B must reproduce."""
    model = chat_model(None, model=str(tiny_model_path(seed=1)))
    try:
        yield {
            "plain": _answers(model),
            "prefixed": _answers(model, PREFIX),
            "branches": [model.invoke([*PREFIX, HumanMessage(s)]).content for s in SUFFIXES],
        }
    finally:
        model.close()


@pytest.fixture(scope="module")
def parent():
    with parent_model(STORE) as model:
        model.engine.start()
        yield model


@pytest.fixture(scope="module")
def pool(parent):
    workers = parent.fork_pool(2)
    try:
        yield workers
    finally:
        workers.close()


def test_cold_start_from_thaw_equals_normal_load(files, reference_b):
    """ChatThaw(weights=B.thaw) on A's folder: vLLM's load_format="thaw" restores B."""
    model = chat_model(None, weights=str(files["B"]))
    try:
        assert _answers(model) == reference_b["plain"]
    finally:
        model.close()


def test_freeze_restore_round_trip_is_bit_exact(parent, files, reference_b):
    before = _answers(parent)
    live_a = files["dir"] / "A-live.thaw"
    parent.freeze_weights(live_a)
    assert parent.load_weights(files["B"]) == "B"
    assert _answers(parent) == reference_b["plain"]
    assert parent.load_weights(live_a, "A-again") == "A-again"
    assert _answers(parent) == before
    again = files["dir"] / "A-again.thaw"
    parent.freeze_weights(again)
    with open_weights(live_a) as first, open_weights(again) as second:
        assert first.header.namespace.layout == "engine"
        assert [t.name for t in first.header.tensors] == [t.name for t in second.header.tensors]
        assert [t.crc32c for t in first.header.tensors] == [t.crc32c for t in second.header.tensors]
        assert bytes(first.payload) == bytes(second.payload)
        second.verify()


def test_kv_snapshot_under_a_is_refused_under_b(parent, pool, files, reference_b):
    """A prefix snapshotted under A: after the swap, loading it is refused (namespace) and the
    pool recomputes the prefix under B; the fork_fanout round runs on B everywhere."""
    version_a = parent.current_weights_version
    handle = parent.snapshot(PREFIX)
    saved = handle.save(files["dir"] / "prefix-a.thawkv")
    prompt = parent.render_prefix([*PREFIX, HumanMessage(SUFFIXES[0])]).token_ids
    options = GenerationOptions(max_tokens=8, temperature=0.0)
    warm = asyncio.run(pool.generate(prompt, options))
    assert warm.cached_tokens > 0  # the pool loads A's snapshot while it runs A

    parent.load_weights(files["B"], "B-1")
    assert pool.load_weights(files["B"], "B-1") == "B-1"
    assert parent.kv_namespace().weights_version == "B-1"
    with pytest.raises(SnapshotMismatchError, match="weights_version"):
        parent.load_snapshot(saved)
    cold = asyncio.run(pool.generate(prompt, options))
    assert cold.cached_tokens == 0, "a snapshot made under A was loaded under B"
    assert cold.route["weights_version"] == "B-1"
    assert version_a != "B-1"

    results = asyncio.run(fork_fanout(parent, PREFIX, SUFFIXES, pool=pool, route="pool"))
    assert [r.error for r in results] == [None] * len(SUFFIXES)
    assert {r.route["weights_version"] for r in results} == {"B-1"}
    assert [r.text for r in results] == reference_b["branches"]
    assert _answers(parent, PREFIX) == reference_b["prefixed"]


def test_state_dict_swap_and_version_rules(parent, files, reference_b):
    """A state dict (CPU tensors: through a temporary shared-memory image) swaps too; every
    swap needs a new version; the temporary image is gone afterwards."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_path(seed=0) / "model.safetensors"))
    assert parent.load_weights(state, "A-sd") == "A-sd"
    with pytest.raises(ValueError, match="already serves"):
        parent.load_weights(state, "A-sd")
    parent.load_weights(files["B"], "B-2")
    assert _answers(parent) == reference_b["plain"]
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"thaw-weights-{os.getpid()}-")]


def _flipped_copy(src: Path, dst: Path) -> Path:
    """``src`` with one bit flipped in the middle of its last tensor's bytes."""
    data = bytearray(src.read_bytes())
    with open_weights(src) as wf:
        last = wf.header.tensors[-1]
        base = len(data) - wf.header.payload_bytes
    data[base + last.offset + last.nbytes // 2] ^= 0x40
    dst.write_bytes(bytes(data))
    return dst


def test_a_corrupted_snapshot_never_serves(parent, files, reference_b):
    """Checkpoint layout: every CRC is checked before vLLM's loaders see a byte, so the swap is
    refused and the engine keeps serving its weights. Engine layout: the CRCs are checked where
    the bytes land, so the swap fails part-way and the engine refuses requests until a good
    load_weights (never answers from a half-swapped model)."""
    parent.load_weights(files["B"], "B-4")
    bad_checkpoint = _flipped_copy(files["B"], files["dir"] / "B-bad.thaw")
    with pytest.raises(Exception, match="CRC32C mismatch"):
        parent.load_weights(bad_checkpoint, "B-bad")
    assert parent.current_weights_version == "B-4"
    assert _answers(parent) == reference_b["plain"]

    live = files["dir"] / "B-live.thaw"
    parent.freeze_weights(live)
    bad_engine = _flipped_copy(live, files["dir"] / "B-live-bad.thaw")
    with pytest.raises(Exception, match="CRC32C mismatch"):
        parent.load_weights(bad_engine, "B-live-bad")
    with pytest.raises(Exception, match="not a verified set"):
        _answers(parent)
    assert parent.load_weights(files["B"], "B-5") == "B-5"
    assert _answers(parent) == reference_b["plain"]


def test_a_restarted_engine_serves_its_last_swap_or_nothing(parent, files, reference_b):
    """The engine core dies after a swap: the restarted engine boots the folder's weights (A),
    so it loads the last swap's .thaw again under its version before it serves; after a swap
    from a state dict (its bytes may have changed since) it refuses requests instead."""
    import signal

    from safetensors.torch import load_file

    from thaw_agents_core.util import compat

    def kill_core() -> None:
        (core,) = compat.engine_core_pids(parent.engine.llm)
        os.kill(core, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not parent.engine.llm.errored and time.monotonic() < deadline:
            time.sleep(0.1)

    restarts = parent.engine.num_restarts
    parent.load_weights(files["B"], "B-6")
    kill_core()
    assert _answers(parent) == reference_b["plain"]
    assert parent.engine.num_restarts == restarts + 1
    assert parent.current_weights_version == "B-6"

    state = load_file(str(tiny_model_path(seed=1) / "model.safetensors"))
    parent.load_weights(state, "B-sd")
    kill_core()
    with pytest.raises(Exception, match="could not be re-applied"):
        _answers(parent)
    parent.load_weights(files["B"], "B-7")
    assert _answers(parent) == reference_b["plain"]
