"""PNG charts of the receipts (matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import load, p50, when, where


def charts(results: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {"thaw": "#2b7bba", "baseline": "#bbbbbb"}
    for path, data in load(results, "pr_review_*.json"):
        rows = data["rounds"]
        rounds = sorted({r["round"] for r in rows})
        by = {(r["mode"], r["round"]): r for r in rows}
        modes = [m for m in ("thaw", "baseline") if (m, rounds[0]) in by]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for k, mode in enumerate(modes):
            xs = [r + (k - 0.5) * 0.38 for r in rounds]
            axes[0].bar(
                xs,
                [by[mode, r]["reviewers_wall_s"] for r in rounds],
                0.38,
                label=mode,
                color=colors[mode],
            )
            axes[1].bar(
                xs,
                [(by[mode, r]["ttft_p50_s"] or 0) * 1e3 for r in rounds],
                0.38,
                label=mode,
                color=colors[mode],
            )
        axes[0].set(title="reviewers step, wall time", xlabel="round", ylabel="s", xticks=rounds)
        axes[1].set(title="time to first token (p50)", xlabel="round", ylabel="ms", xticks=rounds)
        last = rounds[-1]
        computed = [by[m, last]["prefill_computed"] for m in modes]
        reused = [by[m, last]["tokens_reused"] for m in modes]
        xs = range(len(modes))
        axes[2].bar(
            [x - 0.19 for x in xs], computed, 0.38, color="#d95f02", label="prefill computed"
        )
        axes[2].bar(
            [x + 0.19 for x in xs], reused, 0.38, color="#1b9e77", label="reused (not computed)"
        )
        axes[2].set(
            title=f"prompt tokens, round {last}",
            ylabel="tokens",
            xticks=list(xs),
            xticklabels=modes,
        )
        for ax in axes:
            ax.margins(y=0.25)
            ax.legend(frameon=False, fontsize=8, loc="upper left")
        fig.suptitle(
            f"PR review demo: thaw vs baseline — {data.get('model')}, {where(data)}, {when(data)}",
            fontsize=9,
        )
        fig.tight_layout()
        written.append(_save(fig, out / path.with_suffix(".png").name, plt))
    for path, data in load(results, "rl_rollouts_*.json"):
        f, r = data["forked"], data["reprefilled"]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        labels = ["forked", "re-prefilled"]
        axes[0].bar(labels, [f["wall_s"], r["wall_s"]], color=["#2b7bba", "#bbbbbb"])
        axes[0].set(title="wall time of the rollouts", ylabel="s")
        axes[1].bar(
            [-0.19, 0.81],
            [f["prefill_computed"], r["prefill_computed"]],
            0.38,
            color="#d95f02",
            label="prefill computed",
        )
        axes[1].bar(
            [0.19, 1.19],
            [f["tokens_reused"], r["tokens_reused"]],
            0.38,
            color="#1b9e77",
            label="reused (not computed)",
        )
        axes[1].set(title="prompt tokens", ylabel="tokens", xticks=[0, 1], xticklabels=labels)
        axes[1].margins(y=0.25)
        axes[1].legend(frameon=False, fontsize=8, loc="upper left")
        fig.suptitle(
            f"{data['workload']['samples']} rollouts, {where(data)}, {when(data)}", fontsize=9
        )
        fig.tight_layout()
        written.append(_save(fig, out / path.with_suffix(".png").name, plt))
    for path, data in load(results, "fork_fanout_*.json"):
        if "cpu" not in data:
            continue
        c = data["cpu"]
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        labels = [
            "pool worker,\nfrom the snapshot",
            "pool worker,\nre-prefilling",
            "parent engine,\nprefix cache",
        ]
        values = [p50(c[k]) * 1e3 for k in ("pool_fork", "pool_reprefill", "parent")]
        ax.bar(labels, values, color=["#2b7bba", "#bbbbbb", "#7fb3d5"])
        ax.set(ylabel="ms", title=f"branch TTFT, {c['prefix_tokens']}-token prefix, {where(data)}")
        ax.title.set_fontsize(9)
        fig.tight_layout()
        written.append(_save(fig, out / path.with_suffix(".png").name, plt))
    for path, data in load(results, "kv_transport_*.json"):
        sizes = [
            s
            for s, v in data.get("vllm", {}).items()
            if isinstance(v, dict) and "ttft_load_seconds" in v
        ]
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        xs = range(len(sizes))
        ax.bar(
            [x - 0.19 for x in xs],
            [p50(data["vllm"][s]["ttft_load_seconds"]) * 1e3 for s in sizes],
            0.38,
            label="loading the snapshot",
            color="#2b7bba",
        )
        ax.bar(
            [x + 0.19 for x in xs],
            [p50(data["vllm"][s]["ttft_recompute_seconds"]) * 1e3 for s in sizes],
            0.38,
            label="recomputing",
            color="#bbbbbb",
        )
        ax.set(
            xticks=list(xs), xticklabels=sizes, ylabel="ms", title=f"TTFT in vLLM, {where(data)}"
        )
        ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / path.with_suffix(".png").name, plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
