"""Where pool workers go (pool/placement.py): CPU cores, one shared GPU, or GPUs of their own."""

from __future__ import annotations

import pytest

from thaw_agents_core.pool.placement import OWN_DEVICE_FRACTION, Placement, gpu_placements


def test_one_gpu_is_shared_with_the_parent_at_the_given_fraction():
    placements = gpu_placements(3, 0.2, [0])
    assert [p.cuda_device for p in placements] == [0, 0, 0]
    assert all(p.engine_overrides == {"gpu_memory_utilization": 0.2} for p in placements)
    assert placements[0].environment()["CUDA_VISIBLE_DEVICES"] == "0"


def test_several_gpus_leave_the_first_to_the_parent_and_see_it_as_a_peer():
    placements = gpu_placements(7, 0.2, [0, 1, 2, 3, 4, 5, 6, 7])
    assert [p.cuda_device for p in placements] == [1, 2, 3, 4, 5, 6, 7]
    assert all(
        p.engine_overrides["gpu_memory_utilization"] == OWN_DEVICE_FRACTION for p in placements
    )
    env = placements[2].environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "3,0"  # its own device is cuda:0 to its engine


def test_workers_sharing_a_device_split_it():
    placements = gpu_placements(5, 0.2, [4, 6, 7])  # physical ids from CUDA_VISIBLE_DEVICES
    assert [p.cuda_device for p in placements] == [6, 7, 6, 7, 6]
    shares = {p.cuda_device: p.engine_overrides["gpu_memory_utilization"] for p in placements}
    assert shares == {6: round(OWN_DEVICE_FRACTION / 3, 4), 7: round(OWN_DEVICE_FRACTION / 2, 4)}
    assert {p.environment()["CUDA_VISIBLE_DEVICES"] for p in placements} == {"6,4", "7,4"}


def test_cpu_placement_binds_cores_and_no_device():
    env = Placement(cpu_cores=[1]).environment()
    assert env == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "1",
        "OMP_NUM_THREADS": "1",
    }


def test_no_device_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_placements(2, 0.2, [])


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="CPU behaviour: shares need no GPU to refuse"
)
def test_device_shares_are_refused_without_cuda():
    from thaw_agents import ChatThaw
    from thaw_agents_core.pool.fork_pool import ForkPool

    llm = ChatThaw(model="tiny", kv_store="shm://placement-test?capacity=1MiB")
    with pytest.raises(ValueError, match="needs CUDA"):
        ForkPool(llm.engine_spec(), 2, device_shares=True)
