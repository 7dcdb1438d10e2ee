"""The README's "What you get": the demos' side-by-side numbers (pr_review, RL, coders, agent fork)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import GENERATED, chart_link, load, ms, source


def pr_review_section(path: Path, data: dict[str, Any]) -> list[str]:
    rows = data["rounds"]
    steady = data.get("steady_state", {})
    work = data.get("workload", {})
    by = {(r["mode"], r["round"]): r for r in rows}
    lines = [
        f"**`bash scripts/demo.sh`** — {work.get('reviewers', 4)} reviewers on a "
        f"{work.get('prefix_tokens')}-token pull-request prefix, {data.get('model')}, "
        f"{work.get('max_tokens')} new tokens each ({source(path, data)}):",
        "",
        "| round | reviewers wall, thaw / baseline | prefill tokens computed | tokens reused "
        "| time to first token |",
        "|---|---|---|---|---|",
    ]
    for r in sorted({row["round"] for row in rows}):
        t, b = by.get(("thaw", r)), by.get(("baseline", r))
        if t is None or b is None:
            continue
        lines.append(
            f"| {r}{' (cold)' if r == 1 else ''} | {t['reviewers_wall_s']:.2f} s / "
            f"{b['reviewers_wall_s']:.2f} s | {t['prefill_computed']:,} / "
            f"{b['prefill_computed']:,} | {t['tokens_reused']:,} / "
            f"{b['tokens_reused']:,} | {ms(t['ttft_p50_s'])} / {ms(b['ttft_p50_s'])} |"
        )
    if "reviewers_speedup" in steady:
        lines += [
            "",
            f"Steady state (median of rounds {steady['rounds'][0]}-"
            f"{steady['rounds'][-1]}): the reviewers step **{steady['reviewers_speedup']:.2f}x"
            f" faster**, **{steady['prefill_ratio']:.2f}x** the prefill tokens, time to first"
            f" token **{steady['ttft_ratio']:.2f}x**; the whole graph (with its summary "
            f"call) {steady['graph_speedup']:.2f}x. Baseline = the same LangGraph graph with "
            "independent ChatThaw calls and vLLM's prefix cache off; time to first token "
            "counts from the start of the reviewers step (thaw's includes computing the "
            "prefix once).",
        ]
    return lines


def rl_section(path: Path, data: dict[str, Any]) -> list[str]:
    f, r = data["forked"], data["reprefilled"]
    work = data.get("workload", {})
    return [
        f"**`python demos/rl_rollouts.py`** — {work.get('samples')} rollouts of a "
        f"{work.get('trunk_tokens')}-token trunk ({source(path, data)}): "
        f"{data['prefill_tokens_avoided']:,} prefill tokens avoided "
        f"({f['prefill_computed']:,} computed vs {r['prefill_computed']:,} re-prefilling), "
        f"wall {f['wall_s']:.2f} s vs {r['wall_s']:.2f} s, TTFT {ms(f['ttft_p50_s'])} vs "
        f"{ms(r['ttft_p50_s'])}; records + pivot in the output folder "
        "(`thaw-agents rollouts pivot DIR`)."
    ]


def coders_section(path: Path, data: dict[str, Any]) -> list[str]:
    ranked = data["ranked"]
    best = ranked[0]
    rates = ", ".join(f"{r['passed']}/{r['total']}" for r in ranked)
    return [
        f"**`python demos/parallel_coders.py`** — {len(ranked)} coders forked from a "
        f"{data['workload']['prefix_tokens']}-token repository context "
        f"({source(path, data)}): {data['tokens_reused']:,} prefix tokens reused; best "
        f'candidate "{best["approach"]}" passes {best["passed"]}/{best["total"]} tests '
        f"(pass rates: {rates})."
    ]


def agent_fork_section(path: Path, data: dict[str, Any]) -> list[str]:
    r = data["restore"]
    return [
        f"**`python demos/agent_fork.py`** — a session moved to a new process "
        f"({data.get('model')}, {source(path, data)}): {r['cached_tokens']}/"
        f"{r['prompt_tokens']} prompt tokens not recomputed there (load_snapshot "
        f"{ms(r['load_snapshot_s'])}, first token {ms(r['ttft_s'])}); greedy continuation "
        f"identical to the original process's: {data['continuation_equal']} "
        f"({data['tokens_compared']} tokens)."
    ]


def what_you_get(results: Path, chart_dir: Path | None = None) -> str:
    """The README section after the two commands; links the charts in ``chart_dir``."""
    parts = ["## What you get", "", GENERATED, ""]
    for pattern, render in (
        ("pr_review_*.json", pr_review_section),
        ("rl_rollouts_*.json", rl_section),
        ("parallel_coders_*.json", coders_section),
        ("agent_fork_*.json", agent_fork_section),
    ):
        for path, data in load(results, pattern):
            parts += [*render(path, data), ""]
            if pattern in ("pr_review_*.json", "rl_rollouts_*.json"):
                parts += chart_link(chart_dir, path)
    return "\n".join(parts).rstrip() + "\n"
