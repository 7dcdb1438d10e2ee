"""The RL step end to end: rollouts from a shared trunk, a weight update, the push, the next round.

    round k (weights_version "step-k" everywhere):
      trunk    parent.asnapshot(trunk): the prefix computed once under step-k, KV published
      rollouts fork_fanout(n=8, seeded) on a 2-worker ForkPool: each worker loads the trunk's
               KV (cached_tokens > 0), every rollout reports the version it ran on
      train    a deterministic "update": w += lr * N(0, 1) with a per-step seed, on the parent's
               weights (engine layout, frozen once), written into ONE WeightsBuffer in shared
               memory (created once, reused every step; pinned once per worker on a GPU)
      push     parent.load_weights(buffer, "step-k+1") and pool.load_weights(buffer, ...):
               collective_rpc into every engine, CRC-verified, prefix cache reset, KV
               namespace fenced (step-k's trunk snapshot is never loaded again)
    round k+1 recomputes the trunk once under the new weights and forks again.

Prints each phase's time; writes a JSON receipt (benchmarks/results/rl_weight_sync_<cpu|gpu>.json).

    python demos/rl_weight_sync.py [--rounds 3] [--samples 8] [--model PATH] [--receipt PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from demo_support import quiet_environment, write_receipt
from langchain_core.messages import HumanMessage, SystemMessage

TRUNK = " ".join(f"rule {i}: keep the answer short and exact ({i % 5})." for i in range(40))
TASK = "Continue the sequence: 2, 4, 8, 16,"
LEARNING_RATE = 1e-2


def train_step(weights: dict[str, Any], step: int) -> dict[str, Any]:
    """A deterministic stand-in for an optimizer step: w + lr * N(0, 1), seeded by the step."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    return {
        name: (w + LEARNING_RATE * torch.randn(w.shape, generator=g, dtype=w.dtype))
        if w.is_floating_point()
        else w
        for name, w in weights.items()
    }


async def one_round(llm: Any, pool: Any, samples: int, seed: int) -> dict[str, Any]:
    from thaw_agents import fork_fanout

    began = time.perf_counter()
    handle = await llm.asnapshot([SystemMessage(TRUNK)])
    trunk_s = time.perf_counter() - began
    began = time.perf_counter()
    results = await fork_fanout(
        llm,
        handle,
        [HumanMessage(TASK)],
        n=samples,
        pool=pool,
        route="pool",
        options={"temperature": 0.8, "seed": seed, "max_tokens": 16},
    )
    rollouts_s = time.perf_counter() - began
    errors = [r.error for r in results if r.error]
    return {
        "trunk_s": round(trunk_s, 4),
        "rollouts_s": round(rollouts_s, 4),
        "trunk_tokens": handle.num_snapshot_tokens,
        "trunk_weights_version": handle.namespace["weights_version"],
        "trunk_namespace_key": handle.namespace_key,
        "rollout_weights_versions": sorted({r.route.get("weights_version", "") for r in results}),
        "cached_tokens": [r.cached_tokens for r in results],
        "texts": [r.text for r in results],
        "errors": errors,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from thaw_agents import ChatThaw
    from thaw_agents_core.weights.buffer import WeightsBuffer
    from thaw_agents_core.weights.io import open_weights

    store = f"shm://rl-sync-{os.getpid()}?capacity=256MiB"
    llm = ChatThaw(
        model=args.model,
        dtype="float32",
        temperature=0.8,
        max_tokens=16,
        max_model_len=4096,
        engine_kwargs={"kv_cache_memory_bytes": 256 << 20},
        kv_store=store,
        weights_version="step-0",
    )
    rounds: list[dict[str, Any]] = []
    began = time.perf_counter()
    llm.engine.start()
    pool = llm.fork_pool(2)
    startup_s = time.perf_counter() - began
    buffer = None
    try:
        with tempfile.TemporaryDirectory() as tmp:  # the trainer's copy of the weights
            began = time.perf_counter()
            llm.freeze_weights(Path(tmp) / "step-0.thaw")
            with open_weights(Path(tmp) / "step-0.thaw") as wf:
                weights = {t.name: wf.tensor_of(t).clone() for t in wf.header.tensors}
            freeze_s = time.perf_counter() - began
        buffer = WeightsBuffer.for_tensors(weights, slack=0.05)
        for step in range(args.rounds):
            print(f"round {step} (weights {llm.current_weights_version})")
            record = asyncio.run(one_round(llm, pool, args.samples, seed=7))
            print(
                f"  trunk {record['trunk_tokens']} tokens in {record['trunk_s'] * 1e3:.0f} ms; "
                f"{args.samples} rollouts in {record['rollouts_s'] * 1e3:.0f} ms "
                f"(cached tokens {record['cached_tokens'][0]}, versions "
                f"{record['rollout_weights_versions']})"
            )
            t0 = time.perf_counter()
            weights = train_step(weights, step)
            buffer.write(weights, f"step-{step + 1}", layout="engine")
            t1 = time.perf_counter()
            llm.load_weights(buffer, f"step-{step + 1}")
            t2 = time.perf_counter()
            pool.load_weights(buffer, f"step-{step + 1}")
            t3 = time.perf_counter()
            record.update(
                train_s=round(t1 - t0, 4),
                push_parent_s=round(t2 - t1, 4),
                push_pool_s=round(t3 - t2, 4),
                next_version=f"step-{step + 1}",
            )
            print(
                f"  train {record['train_s'] * 1e3:.0f} ms; push to parent "
                f"{record['push_parent_s'] * 1e3:.0f} ms, to 2 workers {record['push_pool_s'] * 1e3:.0f} ms"
            )
            rounds.append(record)
    finally:
        if buffer is not None:
            buffer.close()
        pool.close()
        llm.close()
    checks = {
        "one_version_per_round": all(len(r["rollout_weights_versions"]) == 1 for r in rounds),
        "rollouts_ran_on_the_trunks_version": all(
            r["rollout_weights_versions"] == [r["trunk_weights_version"]] for r in rounds
        ),
        "versions_advance": [r["trunk_weights_version"] for r in rounds]
        == [f"step-{k}" for k in range(len(rounds))],
        "trunk_recomputed_per_version": len({r["trunk_namespace_key"] for r in rounds})
        == len(rounds),
        "trunk_forked_from_kv": all(min(r["cached_tokens"]) > 0 for r in rounds),
        "rollouts_change_with_weights": len({tuple(r["texts"]) for r in rounds}) == len(rounds),
        "no_errors": not any(r["errors"] for r in rounds),
    }
    print("checks:", checks)
    return {
        "model": args.model,
        "samples": args.samples,
        "startup_s": round(startup_s, 3),
        "freeze_s": round(freeze_s, 4),
        "num_weight_bytes": sum(w.numel() * w.element_size() for w in weights.values()),
        "rounds": rounds,
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument(
        "--model", default="tiny", help='model folder, or "tiny" (float32 test model)'
    )
    parser.add_argument("--receipt", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_environment()
    payload = run(args)
    path = write_receipt(args.receipt, "rl_weight_sync", payload)
    print(f"receipt: {path}")
    if not all(v for v in payload["checks"].values()):
        raise SystemExit(f"a check failed: {payload['checks']}")


if __name__ == "__main__":
    main()
