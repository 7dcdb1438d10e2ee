""" "Measured" tables of large fan-outs: vLLM configurations, profile, KV block sizes, the attention kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import p50, source


def _agreement(correctness: dict, config: str) -> Any:
    """Top-1 agreement of ``config`` with vLLM's defaults (per-config dict, or the older flat one)."""
    if "top1_agreement" in correctness:
        return correctness["top1_agreement"]
    return (correctness.get(config) or {}).get("top1_agreement")


def fanout_scale_table(path: Path, data: dict[str, Any]) -> list[str]:
    """Large fan-outs on one GPU: vLLM's defaults (and its cascade opt-in, where measured) against
    the engines ChatThaw/ForkPool start, all in one run."""
    configs = data.get("configs") or {}
    if "vllm_default" not in configs or "thaw" not in configs:
        return []
    cascade = configs.get("vllm_cascade")
    spec, ok = data["spec"], data.get("correctness_8b") or {}
    tiny = data.get("correctness_tiny_fp32") or {}
    others = ["vllm_cascade", "thaw"] if cascade else ["thaw"]
    agree = "; ".join(
        f"{c}: 8B-shaped bf16 top-1 {_agreement(ok, c)}, tiny fp32 {_agreement(tiny, c)}"
        for c in others
    )
    block = configs["thaw"]["features"].get("block_size")
    lines = [
        f"**Large fan-outs** ({source(path, data)}; `benchmarks/fanout_scale.py`; "
        f"{configs['thaw']['features'].get('vllm', '')} vLLM, 8B shapes, bf16, CUDA "
        f"graphs; B branches x {spec['tokens']} tokens over a {spec['prefix']}-token prefix "
        "already cached, every configuration in the same run; vLLM's opt-in is cascade "
        "attention with its V1 model runner; ChatThaw's engines add "
        f"{block or 'larger'}-token KV blocks, `compat.shared_prefix_engine_defaults`). Greedy "
        f"tokens against vLLM's defaults ({agree}); every branch found the whole prefix cached:",
        "",
    ]
    if cascade:
        lines += [
            "| B | vLLM defaults | vLLM cascade opt-in | ChatThaw's engine | vs defaults "
            "| vs opt-in | floor per step |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| B | vLLM defaults | ChatThaw's engine | speedup | floor per step |",
            "|---|---|---|---|---|",
        ]
    rows = zip(configs["vllm_default"]["rows"], configs["thaw"]["rows"])
    for i, (a, b) in enumerate(rows):
        ours = f"{b['wall_s']:.2f} s ({b['ms_per_step']:.1f} ms/step, {b['vs_floor']}x the floor)"
        first = f"| {a['batch']} | {a['wall_s']:.2f} s ({a['ms_per_step']:.1f} ms/step) | "
        if cascade:
            c = cascade["rows"][i]
            lines.append(
                first + f"{c['wall_s']:.2f} s ({c['ms_per_step']:.1f} ms/step) | {ours} | "
                f"**{a['wall_s'] / b['wall_s']:.2f}x** | **{c['wall_s'] / b['wall_s']:.2f}x** | "
                f"{b['floor_ms_per_step']:.1f} ms |"
            )
        else:
            lines.append(
                first + f"{ours} | **{a['wall_s'] / b['wall_s']:.2f}x** | "
                f"{b['floor_ms_per_step']:.1f} ms |"
            )
    return lines


def fanout_profile_lines(path: Path, data: dict[str, Any]) -> list[str]:
    """Where a 256-branch decode round's time goes (``fanout_scale.py --profile``)."""
    thaw = data.get("thaw") or {}
    prof, spec = thaw.get("profile"), data.get("spec") or {}
    if not prof:
        return []
    groups = prof["groups_ms_per_step"]
    rows = thaw.get("rows") or [{}]
    kernels = ", ".join(
        f"{g} {groups[g]:.1f} ms"
        for g in ("matmul", "attention", "other", "sampling")
        if g in groups
    )
    text = (
        f"**Where a large fan-out's time goes** ({source(path, data)}; `fanout_scale.py "
        f"--profile`; ChatThaw's engine, {prof['batch']} branches x {prof['steps']} tokens over "
        f"the {spec.get('prefix')}-token prefix, torch's profiler in the engine's worker): "
        f"{prof['wall_ms_per_step']:.1f} ms of wall per token of the round "
        f"({prof['wall_s']:.2f} s; unprofiled {rows[0].get('wall_s', 0):.2f} s), of which the "
        f"GPU ran kernels {prof['device_ms_per_step']:.1f} ms per step ({kernels}); it was busy "
        f"{prof['device_busy_fraction']:.0%} of the round."
    )
    return [text]


def fanout_blocks_lines(path: Path, data: dict[str, Any]) -> list[str]:
    """ChatThaw's engine at several KV block sizes (``fanout_scale.py --block-sizes``)."""
    sizes = data.get("block_sizes") or {}
    spec = data.get("spec") or {}
    parts = []
    for size, got in sizes.items():
        row = next((r for r in got.get("rows", []) if "split" in r), None)
        if row is None:
            continue
        split = row["split"]
        parts.append(
            (
                row["wall_s"],
                f"block size {size}: {row['wall_s']:.2f} s ({row['ms_per_step']:.1f} ms per token "
                f"of the round = {split['ms_per_decode_step']:.1f} ms per decode step + "
                f"{split['fixed_s']:.2f} s fixed; cached prefix tokens >= "
                f"{row['min_cached_prefix_tokens']})",
                row,
            )
        )
    if not parts:
        return []
    best, worst = min(parts)[0], max(parts)[0]
    row = parts[0][2]
    return [
        f"**KV block size for large fan-outs** ({source(path, data)}; `fanout_scale.py "
        f"--block-sizes`; ChatThaw's engine, {row['batch']} branches x {row['tokens']} tokens "
        f"over the {spec.get('prefix')}-token prefix, each also run for {spec.get('short_tokens')} "
        "tokens to split per-step and fixed cost): "
        + "; ".join(text for _, text, _ in parts)
        + f". Larger blocks: **{worst / best:.2f}x** faster; greedy tokens identical across the "
        f"sizes: {data.get('greedy_identical_across_sizes')}. vLLM hashes, looks up and "
        "references every prefix block of every branch at admission and carries each branch's "
        "block table every step; ChatThaw's CUDA engines take 64 "
        "(`compat.SHARED_PREFIX_BLOCK_SIZE`; vLLM's default is 16)."
    ]


def attention_table(path: Path, data: dict[str, Any]) -> list[str]:
    cfg = data["config"]
    lines = [
        f"**Shared-prefix decode attention kernel** ({source(path, data)}; one layer, "
        f"{cfg['num_q_heads']}/{cfg['num_kv_heads']} heads x {cfg['head_dim']}, {cfg['dtype']}, "
        f"a {cfg['prefix_tokens']}-token prefix shared by B branches, {cfg['tail_tokens']} own "
        "tokens each; not yet wired into vLLM):",
        "",
        "| B | ours | SDPA per branch (gathered KV) | bytes-read floor | max abs diff vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in data["results"]:
        ours, sdpa = r.get("ours") or {}, r.get("sdpa") or {}
        if "ms" not in ours:
            continue
        lines.append(
            f"| {r['B']} | {p50(ours['ms']):.3f} ms | "
            + (
                f"{p50(sdpa['ms']):.3f} ms (**{r.get('speedup_vs_sdpa')}x**)"
                if "ms" in sdpa
                else "-"
            )
            + f" | {r.get('floor_ms', 0):.3f} ms | {ours.get('max_abs_diff', 0):.1e} |"
        )
    return lines
