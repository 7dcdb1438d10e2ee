"""RL-style rollouts: one reasoning trunk, N sampled continuations, recorded and inspected.

    trunk (few-shot worked examples + the problem)
      --fork_fanout(n=8, temperature=0.8, seed, logprobs)--> 8 rollouts from the trunk's KV
      --reward--> each rollout recorded (tokens + log-probabilities) next to the trunk's
                  snapshot in an output DIR --> the pivot: the first generated token where the
                  rollouts part ways, the rollouts grouped by their choice there

Measured in the same run, on the same model and seeds: the same N rollouts with every one
re-prefilling the trunk (independent ChatThaw calls, vLLM's prefix cache off). Prints the
prefill tokens the fork avoided and the time it saved; writes a JSON receipt (default
benchmarks/results/rl_rollouts_<cpu|gpu-slug>.json).

    python demos/rl_rollouts.py [--samples 8] [--max-tokens 96] [--out DIR] [--model PATH]
    thaw-agents rollouts pivot DIR      # the same pivot again, from the records alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from demo_support import quiet_environment, where_it_ran, write_receipt
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from thaw_agents import ChatThaw, fork_fanout
from thaw_agents.rollouts import (
    HANDLE_FILE,
    find_pivot,
    format_pivot,
    read_records,
    record_from_branch,
    write_records,
)

PROBLEM = (
    "A warehouse has 12 shelves. Each shelf holds 8 boxes and each box holds 15 "
    "widgets. A truck takes away 240 widgets. How many widgets are left?"
)
ANSWER = 12 * 8 * 15 - 240
SUFFIX = "Solve it step by step."
EXAMPLES = [
    (
        "A bakery bakes 9 trays of rolls. Each tray has 6 rows of 7 rolls. It sells 150 rolls "
        "in the morning and 98 in the afternoon. How many rolls are left?",
        "Step 1: rolls per tray = 6 rows x 7 rolls = 42 rolls.\n"
        "Step 2: rolls baked = 9 trays x 42 rolls = 378 rolls.\n"
        "Step 3: rolls sold = 150 in the morning + 98 in the afternoon = 248 rolls.\n"
        "Step 4: rolls left = 378 - 248 = 130 rolls.\n"
        "Check: 130 + 248 = 378, and 378 / 9 = 42 = 6 x 7, so every step is consistent.\n"
        "Answer: 130",
    ),
    (
        "A library has 14 shelves with 25 books each. It lends out 117 books and receives 43 "
        "new ones. How many books does it have now?",
        "Step 1: books at the start = 14 shelves x 25 books = 350 books.\n"
        "Step 2: after lending = 350 - 117 = 233 books.\n"
        "Step 3: after the new books arrive = 233 + 43 = 276 books.\n"
        "Check: 276 - 43 + 117 = 350 = 14 x 25, so every step is consistent.\n"
        "Answer: 276",
    ),
    (
        "A farm has 7 fields. Each field has 11 rows of 16 apple trees. A storm knocks down 95 "
        "trees and the farmer plants 40 new ones. How many trees are there now?",
        "Step 1: trees per field = 11 rows x 16 trees = 176 trees.\n"
        "Step 2: trees on the farm = 7 fields x 176 trees = 1232 trees.\n"
        "Step 3: after the storm = 1232 - 95 = 1137 trees.\n"
        "Step 4: after planting = 1137 + 40 = 1177 trees.\n"
        "Check: 1177 - 40 + 95 = 1232 = 7 x 176, so every step is consistent.\n"
        "Answer: 1177",
    ),
]


def trunk_messages() -> list:
    """System prompt, the worked examples as earlier turns, then the problem."""
    messages: list = [
        SystemMessage("You solve word problems step by step and end with 'Answer: N'.")
    ]
    for problem, solution in EXAMPLES:
        messages += [HumanMessage(problem), AIMessage(solution)]
    return [*messages, HumanMessage(PROBLEM)]


def reward(text: str) -> float:
    """1 for the right number, 0.1 for any number (a well-formed attempt), else 0."""
    numbers = [int(n) for n in re.findall(r"\d+", text.replace(",", ""))]
    if ANSWER in numbers:
        return 1.0
    return 0.1 if numbers else 0.0


def _stats(wall_s: float, rows: list[dict[str, Any]], extra_computed: int = 0) -> dict:
    ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    return {
        "wall_s": round(wall_s, 3),
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "prefill_computed": extra_computed
        + sum(r["prompt_tokens"] - r["cached_tokens"] for r in rows),
        "tokens_reused": sum(r["cached_tokens"] for r in rows),
    }


async def forked(llm: ChatThaw, samples: int, options: dict[str, Any]):
    """The N rollouts forked from the trunk (its KV computed once)."""
    began = time.perf_counter()
    first: dict[int, float] = {}
    results = await fork_fanout(
        llm,
        trunk_messages(),
        [SUFFIX],
        n=samples,
        options=options,
        on_token=lambda i, _t: first.setdefault(i, time.perf_counter() - began),
    )
    wall = time.perf_counter() - began
    rows = [
        {
            "ttft_s": first.get(r.index),
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "text": r.text,
        }
        for r in results
    ]
    trunk_tokens = len(llm.render_prefix(trunk_messages()).token_ids)
    return results, _stats(wall, rows, extra_computed=trunk_tokens), rows


async def reprefilled(llm: ChatThaw, samples: int, options: dict[str, Any]):
    """The same N rollouts as independent calls, each prefilling the whole trunk."""
    began = time.perf_counter()
    prompt = [*trunk_messages(), HumanMessage(SUFFIX)]

    async def one(k: int) -> dict[str, Any]:
        ttft, reply = None, None
        async for chunk in llm.astream(
            prompt, temperature=options["temperature"], seed=options["seed"] + k
        ):
            if ttft is None and chunk.content:
                ttft = time.perf_counter() - began
            reply = chunk if reply is None else reply + chunk
        usage = reply.usage_metadata or {}
        return {
            "ttft_s": ttft,
            "prompt_tokens": usage.get("input_tokens", 0),
            "cached_tokens": (usage.get("input_token_details") or {}).get("cache_read", 0),
            "text": reply.content,
        }

    rows = list(await asyncio.gather(*(one(k) for k in range(samples))))
    return _stats(time.perf_counter() - began, rows), rows


def record_rollouts(out: Path, results: list, options: dict[str, Any]) -> dict[str, Any]:
    """Save the trunk's snapshot + handle and one JSON record per rollout into ``out``."""
    handle = results[0].prefix
    snapshot_path = Path(handle.save(out))
    (out / HANDLE_FILE).write_text(json.dumps(handle.to_json(), indent=1) + "\n")
    prefix = {
        "snapshot_file": snapshot_path.name,
        "snapshot_id": handle.snapshot_id,
        "num_tokens": handle.num_tokens,
        "handle_file": HANDLE_FILE,
    }
    records = [
        record_from_branch(
            r,
            rollout_id=f"rollout-{r.sample_index:03d}",
            prefix=prefix,
            suffix=SUFFIX,
            reward=reward(r.text),
            options={**options, "seed": options["seed"] + r.sample_index},
        )
        for r in results
    ]
    write_records(out, records)
    return {
        "snapshot": str(snapshot_path),
        "snapshot_bytes": snapshot_path.stat().st_size,
        "num_snapshot_tokens": handle.num_snapshot_tokens,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    options = {"temperature": 0.8, "seed": 1}
    common = {"model": args.model, "max_tokens": args.max_tokens, "max_model_len": 4096}
    thaw = ChatThaw(**common, kv_store="auto")
    base = ChatThaw(**common, enable_prefix_caching=False)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="thaw-rollouts-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        for llm in (thaw, base):  # start and warm up both engines before any timing
            await asyncio.to_thread(llm.engine.start)
            await llm.ainvoke("Hi", max_tokens=1)
        results, fork_stats, fork_rows = await forked(
            thaw, args.samples, {**options, "logprobs": True}
        )
        base_stats, base_rows = await reprefilled(base, args.samples, options)
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"rollouts failed: {failed}")
        saved = record_rollouts(out, results, options)
    finally:
        thaw.close()
        base.close()
    records = read_records(out)
    pivot = find_pivot(records)
    avoided = base_stats["prefill_computed"] - fork_stats["prefill_computed"]
    same = sum(a["text"] == b["text"] for a, b in zip(fork_rows, base_rows))
    print(
        f"\n=== {args.samples} rollouts of one {records[0].prefix['num_tokens']}-token trunk,"
        f" {thaw.model_name}, {where_it_ran()} ==="
    )
    print(f"{'':24}{'forked (thaw)':>16}{'re-prefilled':>16}")
    for label, key, fmt in (
        ("wall time", "wall_s", "{:.2f} s"),
        ("TTFT p50", "ttft_p50_s", "{:.3f} s"),
        ("prefill tokens computed", "prefill_computed", "{:,}"),
        ("prompt tokens reused", "tokens_reused", "{:,}"),
    ):
        print(f"{label:24}{fmt.format(fork_stats[key]):>16}{fmt.format(base_stats[key]):>16}")
    saved_s = base_stats["wall_s"] - fork_stats["wall_s"]
    print(
        f"prefill tokens avoided: {avoided:,}; time saved: {saved_s:.2f} s "
        f"({base_stats['wall_s'] / fork_stats['wall_s']:.2f}x); same text with the same seed:"
        f" {same}/{args.samples}"
    )
    for r in sorted(records, key=lambda r: -r.sequence_logprob):
        print(
            f"  {r.rollout_id}: reward {r.reward:.1f}, sequence logprob "
            f"{r.sequence_logprob:.1f} over {len(r.token_ids)} tokens"
        )
    print(f"\nrecords + trunk snapshot in {out}\n{format_pivot(pivot, len(records))}")
    print(f"(again, without an engine: thaw-agents rollouts pivot {out})")
    receipt = write_receipt(
        args.receipt,
        "rl_rollouts",
        {
            "model": thaw.model_name,
            "workload": {
                "samples": args.samples,
                "max_tokens": args.max_tokens,
                **options,
                "trunk_tokens": records[0].prefix["num_tokens"],
            },
            "forked": fork_stats,
            "reprefilled": base_stats,
            "prefill_tokens_avoided": avoided,
            "time_saved_s": round(saved_s, 3),
            "same_text_same_seed": same,
            "out": str(out),
            **saved,
            "pivot": pivot.to_json() if pivot else None,
            "rollouts": [
                {
                    "rollout_id": r.rollout_id,
                    "reward": r.reward,
                    "num_tokens": len(r.token_ids),
                    "sequence_logprob": round(r.sequence_logprob, 3),
                }
                for r in records
            ],
        },
    )
    print(f"receipt: {receipt}")
    return {"receipt": str(receipt), "out": str(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=None, help="output DIR (default: a new temp folder)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--receipt", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples must be >= 2 (a pivot compares rollouts), got {args.samples}")
    quiet_environment()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
