"""Benchmark: what ChatThaw costs on top of vLLM, and what concurrency buys.

    .venv/bin/python benchmarks/chat_concurrency.py            # -> results/chat_concurrency_cpu.json
    .venv/bin/python benchmarks/chat_concurrency.py --requests 8 --rounds 1   # quick check

One engine (the embedded SmolLM2-135M-Instruct, greedy), three ways to run the same requests:

    (a) chat_concurrent  N ``ChatThaw.ainvoke`` in one asyncio.gather (the caller's loop; every
                         call crosses to the engine's loop thread, see engine.py)
    (b) raw_concurrent   the same N requests straight into the same vLLM ``AsyncLLM``
                         (``generate`` with ``TokensPrompt`` of the same rendered token ids and
                         equivalent ``SamplingParams``), gathered on the engine's own loop
    (c) chat_sequential  the same N requests as N blocking ``ChatThaw.invoke`` calls

Workload: N distinct prompts (default 32), each exactly T new tokens (default 64:
``max_tokens=T, ignore_eos=True``). Prompts stay under one CPU KV block (128 tokens), so no
run is served from another's prefix cache (checked: ``cache_read`` must be 0).

Timing: a warm-up first; then (a) and (b) ``--rounds`` times, interleaved and alternating
which goes first, and the medians are reported; (c) once (it is the slow one). Per-request
latency = that request's finish time - the batch's start (p20/p50/p80). Goals: ChatThaw /
raw throughput >= 0.9; concurrent / sequential >= 3. The machine may be running other work:
the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, device_slug, load_average, machine_info, percentiles, write_results

GOALS = {"chat_vs_raw_throughput": 0.9, "concurrent_vs_sequential_throughput": 3.0}
TOPICS = [
    "a dragon",
    "the sea",
    "a robot",
    "a lighthouse",
    "a city at night",
    "a lost key",
    "a small boat",
    "the moon",
    "a library",
    "a mountain",
    "an old clock",
    "a garden",
    "a train",
    "a snowstorm",
    "a violin",
    "a desert",
    "a fox",
    "a bridge",
    "a comet",
    "a baker",
    "a river",
    "a castle",
    "a cat",
    "a forest",
    "a market",
    "a storm",
    "an island",
    "a painter",
    "a kite",
    "a volcano",
    "a letter",
    "a festival",
]


def prompts(count: int) -> list[str]:
    return [
        f"Write a short story about {TOPICS[i % len(TOPICS)]} (story {i + 1})."
        for i in range(count)
    ]


def summarize(
    name: str, wall_s: float, latencies_s: list[float], output_tokens: int, cache_read: int = 0
) -> dict[str, Any]:
    return {
        "mode": name,
        "wall_s": round(wall_s, 3),
        "output_tokens": output_tokens,
        "output_tok_per_s": round(output_tokens / wall_s, 2),
        "latency_s": percentiles(latencies_s),
        "cache_read_tokens": cache_read,
    }


async def chat_concurrent(llm: Any, texts: list[str], num_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    latencies: list[float] = []

    async def one(text: str) -> Any:
        message = await llm.ainvoke(text, max_tokens=num_tokens, ignore_eos=True)
        latencies.append(time.perf_counter() - start)
        return message

    messages = await asyncio.gather(*(one(text) for text in texts))
    wall = time.perf_counter() - start
    tokens = sum(m.usage_metadata["output_tokens"] for m in messages)
    cached = sum(m.usage_metadata["input_token_details"]["cache_read"] for m in messages)
    _check_lengths([m.usage_metadata["output_tokens"] for m in messages], num_tokens)
    return summarize("chat_concurrent", wall, latencies, tokens, cached)


async def raw_concurrent(
    async_llm: Any, prompt_ids: list[list[int]], num_tokens: int, tag: str
) -> dict[str, Any]:
    """Runs on the engine's loop: AsyncLLM's output handler is bound to it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=0.0,
        max_tokens=num_tokens,
        ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    start = time.perf_counter()
    latencies: list[float] = []

    async def one(i: int, ids: list[int]) -> Any:
        final = None
        async for output in async_llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, f"bench-raw-{tag}-{i}"
        ):
            final = output  # FINAL_ONLY: the last output is the whole answer
        latencies.append(time.perf_counter() - start)
        return final

    finals = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
    wall = time.perf_counter() - start
    lengths = [len(final.outputs[0].token_ids) for final in finals]
    _check_lengths(lengths, num_tokens)
    cached = sum(int(final.num_cached_tokens or 0) for final in finals)
    return summarize("raw_concurrent", wall, latencies, sum(lengths), cached)


def chat_sequential(llm: Any, texts: list[str], num_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    latencies, tokens, cached = [], 0, 0
    for text in texts:
        began = time.perf_counter()
        message = llm.invoke(text, max_tokens=num_tokens, ignore_eos=True)
        latencies.append(time.perf_counter() - began)
        _check_lengths([message.usage_metadata["output_tokens"]], num_tokens)
        tokens += message.usage_metadata["output_tokens"]
        cached += message.usage_metadata["input_token_details"]["cache_read"]
    wall = time.perf_counter() - start
    result = summarize("chat_sequential", wall, latencies, tokens, cached)
    result["latency_note"] = "per call, each alone in the engine"
    return result


def _check_lengths(lengths: list[int], expected: int) -> None:
    if any(length != expected for length in lengths):
        raise RuntimeError(f"expected {expected} output tokens per request, got {lengths}")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(run[key] for run in runs), 3)

    return {
        "wall_s": med("wall_s"),
        "output_tok_per_s": med("output_tok_per_s"),
        "latency_s": {
            q: round(statistics.median(run["latency_s"][q] for run in runs), 3)
            for q in ("p20", "p50", "p80")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (b)")
    parser.add_argument(
        "--out",
        default=None,
        help="results JSON (default: results/chat_concurrency_<cpu|gpu-name>.json)",
    )
    args = parser.parse_args(argv)

    from langchain_core.messages import HumanMessage

    from thaw_agents import ChatThaw
    from thaw_agents.messages import render

    load_before = load_average()
    texts = prompts(args.requests)
    started = time.perf_counter()
    llm = ChatThaw(max_model_len=4096, temperature=0.0)
    engine = llm.engine
    engine.start()
    engine_start_s = time.perf_counter() - started
    prompt_ids = [render(engine.tokenizer, [HumanMessage(text)]).token_ids for text in texts]
    if max(map(len, prompt_ids)) >= 128:
        raise RuntimeError("prompts must stay under one CPU KV block (128 tokens)")

    print(f"engine up in {engine_start_s:.1f} s; warming up ...", flush=True)
    asyncio.run(chat_concurrent(llm, [f"Warm-up {i}: say hello." for i in range(8)], 8))
    engine.run_sync(raw_concurrent(engine.llm, prompt_ids[:8], 8, "warmup"))

    rounds: dict[str, list[dict[str, Any]]] = {"chat_concurrent": [], "raw_concurrent": []}
    for r in range(args.rounds):
        order = ("chat", "raw") if r % 2 == 0 else ("raw", "chat")
        for which in order:
            if which == "chat":
                run = asyncio.run(chat_concurrent(llm, texts, args.tokens))
            else:
                run = engine.run_sync(raw_concurrent(engine.llm, prompt_ids, args.tokens, str(r)))
            run["round"] = r
            rounds[run["mode"]].append(run)
            print(
                f"  round {r} {run['mode']:<16} {run['wall_s']:7.2f} s  "
                f"{run['output_tok_per_s']:7.1f} tok/s",
                flush=True,
            )
    print("  sequential ...", flush=True)
    sequential = chat_sequential(llm, texts, args.tokens)
    load_after = load_average()

    chat, raw = median_of(rounds["chat_concurrent"]), median_of(rounds["raw_concurrent"])
    seq = {key: sequential[key] for key in ("wall_s", "output_tok_per_s", "latency_s")}
    ratios = {
        "chat_vs_raw_throughput": round(chat["output_tok_per_s"] / raw["output_tok_per_s"], 3),
        "concurrent_vs_sequential_throughput": round(
            chat["output_tok_per_s"] / seq["output_tok_per_s"], 3
        ),
    }
    model_config = engine.llm.model_config
    result = {
        "benchmark": "chat_concurrency",
        "workload": {
            "requests": args.requests,
            "new_tokens_per_request": args.tokens,
            "prompt_tokens": {"min": min(map(len, prompt_ids)), "max": max(map(len, prompt_ids))},
            "sampling": "greedy (temperature 0), ignore_eos",
            "rounds": args.rounds,
            "prefix_cache_hits": sum(
                run["cache_read_tokens"] for runs in rounds.values() for run in runs
            )
            + sequential["cache_read_tokens"],
        },
        "model": {
            "name": llm.model_name,
            "dtype": str(model_config.dtype).replace("torch.", ""),
            "max_model_len": model_config.max_model_len,
        },
        "machine": {
            **machine_info(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "engine_start_s": round(engine_start_s, 1),
        "median": {"chat_concurrent": chat, "raw_concurrent": raw, "chat_sequential": seq},
        "notes": [
            "concurrent modes: all requests start together and have the same length, so they "
            "finish in the same engine step (latency p20 ~ p80 ~ wall); sequential: each call "
            "alone, its own latency",
            "throughput = output tokens of all requests / wall time of the whole batch",
        ],
        "ratios": ratios,
        "goals": GOALS,
        "goals_met": {name: ratios[name] >= goal for name, goal in GOALS.items()},
        "runs": [*rounds["chat_concurrent"], *rounds["raw_concurrent"], sequential],
    }
    llm.close()

    out = Path(args.out) if args.out else RESULTS / f"chat_concurrency_{device_slug()}.json"
    path = write_results(out, result)
    print(
        f"\n{llm.model_name} ({result['model']['dtype']}), {args.requests} requests x "
        f"{args.tokens} new tokens, medians of {args.rounds} rounds; "
        f"load {load_before} -> {load_after}"
    )
    print(f"{'mode':<18}{'wall s':>9}{'tok/s':>9}{'lat p20':>9}{'p50':>8}{'p80':>8}")
    for name, row in result["median"].items():
        lat = row["latency_s"]
        print(
            f"{name:<18}{row['wall_s']:>9.2f}{row['output_tok_per_s']:>9.1f}"
            f"{lat['p20']:>9.2f}{lat['p50']:>8.2f}{lat['p80']:>8.2f}"
        )
    for name, value in ratios.items():
        print(
            f"{name}: {value:.3f} (goal >= {GOALS[name]}) "
            f"{'met' if value >= GOALS[name] else 'NOT met'}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
