""" "Measured" tables of the KV path: ChatThaw throughput, fork_fanout, KV transport, kernels, stream scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import ms, p50, source


def chat_table(path: Path, data: dict[str, Any]) -> list[str]:
    med, work = data["median"], data["workload"]
    names = {
        "chat_concurrent": f"{work['requests']} concurrent `ainvoke` through ChatThaw",
        "raw_concurrent": "the same requests straight into vLLM's AsyncLLM",
        "chat_sequential": f"{work['requests']} sequential ChatThaw calls",
    }
    lines = [
        f"**ChatThaw throughput** ({source(path, data)}; {work['requests']} requests x "
        f"{work['new_tokens_per_request']} new tokens):",
        "",
        "| path | wall | output tok/s |",
        "|---|---|---|",
    ]
    lines += [
        f"| {names[k]} | {med[k]['wall_s']:.2f} s | {med[k]['output_tok_per_s']:.0f} |"
        for k in names
        if k in med
    ]
    ratios = data.get("ratios", {})
    if ratios:
        lines += [
            "",
            f"ChatThaw / raw engine = {ratios['chat_vs_raw_throughput']:.2f}; "
            f"concurrent / sequential = {ratios['concurrent_vs_sequential_throughput']:.1f}x.",
        ]
    return lines


def fanout_rows(path: Path, data: dict[str, Any]) -> list[str]:
    if "cpu" in data:
        c = data["cpu"]
        return [
            f"| {source(path, data)} | {c['branches_per_round']} branches over a "
            f"{c['prefix_tokens']}-token prefix, {c['workers']} workers | branch TTFT "
            f"{ms(p50(c['pool_fork']))} from the snapshot vs {ms(p50(c['pool_reprefill']))} "
            f"re-prefilling: **{c['ttft_ratio_fork_vs_reprefill_p50']:.2f}x**; in-parent "
            f"branches {ms(p50(c['parent']))}; every forked branch reused >= "
            f"{c['min_cached_tokens_in_forked_branches']} prefix tokens |"
        ]
    g = data["gpu"]
    mode = "CUDA graphs" if g.get("cuda_graphs") else "eager"
    text = (
        f"in-engine prefix cache {p50(g['in_engine']):.3f} s; fork_fanout (auto) "
        f"{p50(g['fork_auto']):.3f} s (**{g['ratio_fork_auto_vs_in_engine_p50']:.2f}x**)"
    )
    if g.get("fork_pool"):
        text += (
            f"; all branches in a pool worker on the same GPU {p50(g['fork_pool']):.3f} s "
            f"({g['ratio_fork_pool_vs_in_engine_p50']:.2f}x)"
        )
    cached = {k: v for k, v in (g.get("cached_tokens") or {}).items() if v is not None}
    if cached:
        text += "; cached prefix tokens per branch: " + ", ".join(
            f"{v} ({k.replace('fork_', '')})" for k, v in cached.items()
        )
    return [f"| {source(path, data)}, {mode} | {g['prefix_tokens']}-token prefix | {text} |"]


def kv_table(path: Path, data: dict[str, Any]) -> list[str]:
    modes = data.get("vllm", {}).get("modes") or {
        data.get("verify_mode", "default"): data.get("vllm", {})
    }
    lines = [
        f"**KV transport** ({source(path, data)}):",
        "",
        "| prefix | snapshot (data path) | load (data path) | bytes checked before the offer "
        "| load inside vLLM (connector) | TTFT loading vs recomputing |",
        "|---|---|---|---|---|---|",
    ]
    checked = {
        "prefetch": "copied to the GPU and checked there (default on CUDA)",
        "host-check": "host CRC pass (before)",
        "on-copy": "none: checked as loaded",
        "default": "-",
    }
    checked.update({f"{k}+graphs": f"{v}; CUDA graphs" for k, v in checked.items()})
    for size, d in data["data_path"].items():
        if not isinstance(d, dict):
            continue
        for mode, per_size in modes.items():
            v = per_size.get(size)
            if not isinstance(v, dict) or "ttft_load_seconds" not in v:
                continue
            ratio = p50(v["ttft_load_seconds"]) / p50(v["ttft_recompute_seconds"])
            lines.append(
                f"| {int(d['bytes']) / 1e6:,.0f} MB ({d['tokens']} tokens) | "
                f"{p50(d['save_seconds']) * 1e3:.2f} ms | {p50(d['load_seconds']) * 1e3:.2f} ms"
                f" ({d['load_GBps_p50']:.1f} GB/s) | {checked.get(mode, mode)} | "
                f"{p50(v['connector_load_seconds']) * 1e3:.2f} ms "
                f"({v['connector_load_GBps_p50']:.1f} GB/s) | "
                f"{ms(p50(v['ttft_load_seconds']))} vs {ms(p50(v['ttft_recompute_seconds']))}"
                f" (**{ratio:.2f}x**) |"
            )
    outcomes = {
        mode: per_size["corrupted"]["outcome"]
        for mode, per_size in modes.items()
        if isinstance(per_size.get("corrupted"), dict) and "outcome" in per_size["corrupted"]
    }
    if outcomes:
        lines += [
            "",
            "A snapshot with one flipped payload byte, same run: "
            + "; ".join(f"{mode}: {outcome}" for mode, outcome in outcomes.items())
            + ".",
        ]
    return lines


def kernels_table(path: Path, data: dict[str, Any]) -> list[str]:
    public = data["summary"]["public"]
    copies = {r["size"]: r for r in data["rows"] if r["op"] == "d2d_copy"}
    sizes = list(public["gather"])
    lines = [
        f"**Kernels** ({source(path, data)}; public calls):",
        "",
        "| op | " + " | ".join(sizes) + " |",
        "|---|" + "---|" * len(sizes),
        "| device-to-device copy | "
        + " | ".join(f"{copies[s]['ms_p50']:.3f} ms" if s in copies else "-" for s in sizes)
        + " |",
    ]
    for op in ("gather", "scatter"):
        lines.append(
            f"| `kv_{op}` | "
            + " | ".join(
                f"{public[op][s]['ms_p50']:.3f} ms ({public[op][s]['vs_d2d']:.2f} of the copy)"
                for s in sizes
            )
            + " |"
        )
        row = public[op]
        if all("device_vs_d2d" in row[s] for s in sizes):
            lines.append(
                f"| `kv_{op}`, device time (kernel only; host per call) | "
                + " | ".join(
                    f"{row[s]['device_ms']:.3f} ms (**{row[s]['device_vs_d2d']:.2f}** of the copy; "
                    f"host {row[s]['host_us']:.0f} us)"
                    for s in sizes
                )
                + " |"
            )
    crc = {k: v for k, v in public.get("crc32c", {}).items() if "chunk=1024K" in k}
    if crc:
        lines.append(
            "| `chunk_crc32c` (1 MiB chunks) | "
            + " | ".join(f"{v['payload_GBps']:,.0f} GB/s" for v in crc.values())
            + " |"
        )
    return lines


def stream_table(path: Path, data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    size = data["bytes"] / 2**30
    return [
        f"**Stream scheduler** ({source(path, data)}; {size:g} GiB, CRC32C included): "
        f"registered host memory {rows['registered_h2d_crc']['GBps_p50']:.1f} GB/s H2D / "
        f"{rows['registered_d2h_crc']['GBps_p50']:.1f} GB/s D2H = "
        f"{rows['registered_h2d_crc']['ratio_vs_raw_pinned']:.2f}x / "
        f"{rows['registered_d2h_crc']['ratio_vs_raw_pinned']:.2f}x a raw pinned copy; "
        f"pageable memory through pinned staging {rows['staged_h2d_crc']['GBps_p50']:.1f} / "
        f"{rows['staged_d2h_crc']['GBps_p50']:.1f} GB/s."
    ]
