"""KV snapshots: tensor-parallel ranks have their own namespaces, pipeline stages are refused;
CPU thread binding for tensor-parallel ranks."""

from __future__ import annotations

import os

import pytest

from thaw_agents_core.util.compat import bind_cpu_ranks


@pytest.mark.parametrize("pp", [2, 4])
def test_the_connector_refuses_pipeline_stages(pp):
    from thaw_agents_core.connector.settings import check_pipeline_stages

    with pytest.raises(ValueError, match="one pipeline stage per engine"):
        check_pipeline_stages(pp)


def test_the_connector_takes_one_stage():
    from thaw_agents_core.connector.settings import check_pipeline_stages

    check_pipeline_stages(1)


def _namespace(tensor_rank: str):
    from thaw_agents_core.snapshot.namespace import Namespace

    return Namespace("m", "", "float32", "float32", "cpu", 16, 2, (16, 2, 64), "0.32.0",
                     tensor_rank=tensor_rank)  # fmt: skip


def test_each_tensor_rank_has_its_own_namespace_key():
    keys = {_namespace(r).key() for r in ("", "0/2", "1/2", "0/4")}
    assert len(keys) == 4
    one = _namespace("")
    assert "tensor_rank" not in one.to_json()  # single-rank keys are what they were
    for r in ("", "1/2"):
        ns = _namespace(r)
        assert type(ns).from_json(ns.to_json()) == ns


@pytest.mark.parametrize("bad", ["2/2", "0/1", "1/0", "-1/2", "01/2", "1/2/3", "a/b", "1", "０/2"])
def test_a_malformed_tensor_rank_is_refused(bad):
    with pytest.raises(ValueError, match="tensor_rank"):
        _namespace(bad)


def test_cpu_ranks_get_their_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    bind_cpu_ranks(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"


def test_cpu_rank_binding_keeps_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "7|8")
    bind_cpu_ranks(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "7|8"


def test_cpu_ranks_need_a_core_each(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(ValueError, match="needs 2 cores"):
        bind_cpu_ranks(2)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_rank_names_for_kv_files_and_urls():
    from thaw_agents_core.snapshot.ranks import rank_name, split_rank_name

    assert rank_name("d/x.thawkv", 0, 1, ".thawkv") == "d/x.thawkv"
    assert rank_name("d/x.thawkv", 1, 2, ".thawkv") == "d/x.tp1of2.thawkv"
    assert rank_name("s3://b/k/x.thawkv", 0, 4, ".thawkv") == "s3://b/k/x.tp0of4.thawkv"
    assert split_rank_name("s3://b/k/x.tp3of4.thawkv", ".thawkv") == ("s3://b/k/x.thawkv", 3, 4)
    assert split_rank_name("d.tp1of2/x.thawkv", ".thawkv") == ("d.tp1of2/x.thawkv", 0, 1)
    for bad in (
        ("d/x.bin", 0, 2),
        ("d/x.thawkv", 2, 2),
        ("d/x.thawkv", -1, 2),
        ("d/x.thawkv", 0, 0),
    ):
        with pytest.raises(ValueError):
            rank_name(*bad, ".thawkv")
    with pytest.raises(ValueError, match="not below"):
        split_rank_name("x.tp2of2.thawkv", ".thawkv")


def test_namespace_for_rank_and_tensor_size():
    from thaw_agents_core.snapshot.namespace import Namespace

    ns = Namespace("m", "w", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0", tensor_rank="0/2")
    one = ns.for_rank(1)
    assert (one.tensor_rank, one.tensor_size, ns.tensor_size) == ("1/2", 2, 2)
    assert one.key() != ns.key() and one.for_rank(0).key() == ns.key()
    single = Namespace("m", "w", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
    assert single.tensor_size == 1 and single.for_rank(0).key() == single.key()
