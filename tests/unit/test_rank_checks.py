"""One rank per engine for KV snapshots; CPU thread binding for tensor-parallel ranks."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from thaw_agents_core.util.compat import bind_cpu_ranks


def _config(tp: int, pp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    )


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (4, 2)])
def test_the_connector_refuses_several_ranks(tp, pp):
    from thaw_agents_core.connector.facade import check_single_rank

    with pytest.raises(ValueError, match="one rank per engine"):
        check_single_rank(_config(tp, pp))


def test_the_connector_takes_one_rank():
    from thaw_agents_core.connector.facade import check_single_rank

    check_single_rank(_config(1))


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
