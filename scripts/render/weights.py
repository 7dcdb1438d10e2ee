""" "Measured" tables of weights: swaps, restores, cold starts, state dicts, and the host paths that bound them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import median_of, ms, source


def weights_quick_lines(path: Path, data: dict[str, Any]) -> list[str]:
    """The quick run (``weights.py --quick``): where a state-dict push and a cold start spend
    their time."""

    def ms1(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"

    ph = data["phases"]
    sd, cold = ph.get("state_dict") or {}, ph.get("cold_thaw") or {}
    how = "--quick --no-cold" if "_no_cold" in path.stem else "--quick"
    text = [f"**Weights, where the time goes** ({source(path, data)}; `weights.py {how}`):"]
    if "seconds" in sd:
        caller = [c or {} for c in sd.get("caller_spans", [])]
        spans = {
            k: median_of([c.get(k) for c in caller]) for k in ("describe_s", "rpc_s", "reset_s")
        }
        worker = {
            k: median_of([w.get(k) for w in sd.get("worker_spans", [])])
            for k in ("parse_s", "check_s", "install_s", "release_s")
        }
        call = median_of(sd.get("worker_call_seconds", []))
        copy = median_of(sd.get("worker_seconds", []))
        packed = sd.get("packed") or {}
        more = "".join(
            f", {what} {ms1(worker[k])}"
            for k, what in (
                ("check_s", "table checked"),
                ("install_s", "install (opens, copies)"),
                ("release_s", "last swap's tensors dropped"),
            )
            if worker[k] is not None
        )
        text.append(
            f"a state-dict push (CUDA IPC, one handle per tensor) {ms1(sd['seconds'])} = "
            f"describe {ms1(spans['describe_s'])} + the load RPC {ms1(spans['rpc_s'])} (in the "
            f"worker {ms1(call)}: handles validated {ms1(worker['parse_s'])}{more}; opened and "
            f"copied {ms1(copy)}) + "
            + (
                f"prefix-cache reset {ms1(spans['reset_s'])}"
                if (spans["reset_s"] or 0) >= 5e-4
                else "the prefix-cache reset (sent right behind the load: inside its time)"
            )
            + ", against a device copy of "
            f"{ms1(sd.get('d2d_s'))} (**{sd.get('ratio_to_d2d')}x**)"
            + (
                f"; the same weights as views of one flat buffer (one handle) "
                f"{ms1(packed['seconds'])} (**{packed['ratio_to_d2d']}x**)."
                if "seconds" in packed
                else "."
            )
        )
    loader = cold.get("thaw_loader") or {}
    if loader:

        def sec(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        text.append(
            f"Cold start from `.thaw`: vLLM's model loading {sec(cold.get('model_loading_s'))}, "
            f"of which the thaw loader {sec(loader['loader_s'])} (its restore "
            f"{sec(loader['restore_s'])}"
            + (f", first-use setup {sec(loader['warm_up_s'])}" if "warm_up_s" in loader else "")
            + f"); a dummy load's "
            f"{sec((ph.get('dummy') or {}).get('model_loading_s'))}; vLLM's safetensors load "
            f"{sec((ph.get('normal') or {}).get('model_loading_s'))}."
        )
    return [" ".join(text)]


def weights_table(path: Path, data: dict[str, Any]) -> list[str]:
    if "_quick" in path.stem:
        return weights_quick_lines(path, data)
    ph, goals = data["phases"], data["goals"]
    if data.get("smoke"):
        swap, restore = ph.get("hot_swap", {}), ph.get("file_restore", {})
        return [
            f"**Weights, CPU** ({source(path, data)}; tiny float32 model): hot swap "
            f"{ms(swap.get('seconds'))}, restore from a `.thaw` file {ms(restore.get('seconds'))}, "
            f"greedy tokens identical after every path: {goals.get('greedy_tokens_identical')}."
        ]

    def cell(phase: str, key: str, fmt: str) -> str:
        value = (ph.get(phase) or {}).get(key)
        return fmt.format(value) if value is not None else ph.get(phase, {}).get("error", "-")

    def timed(phase: str, seconds_fmt: str, rate_fmt: str = "**{} GB/s**") -> str:
        """The phase's seconds and rate: "0.306 s (52.5 GB/s)"."""
        return f"{cell(phase, 'seconds', seconds_fmt)} ({cell(phase, 'gb_per_s', rate_fmt)})"

    gb = data["phases"].get("freeze", {}).get("num_bytes", 0) / 1e9
    cold = goals.get("cold_start_weight_phase_s") or {}

    def worker_s(phase: str) -> str:
        """The worker's own time (the rest is vLLM's RPC and prefix-cache reset), if recorded."""
        inner = (ph.get(phase) or {}).get("worker_seconds")
        return f"; in the worker {min(inner):.3f} s" if inner else ""

    freeze = ph.get("freeze") or {}
    freeze_bound = (
        f"; this host's page cache takes a new file at {freeze['page_cache_write_gb_per_s']} "
        f"GB/s (so 10 GB/s cannot be reached here); with fsync {freeze['durable_seconds']:.1f} s"
        if "page_cache_write_gb_per_s" in freeze
        else ""
    )
    sd = ph.get("state_dict") or {}
    first_push = (
        f"; the first push of a state dict (every handle opened) **{sd['first_ratio_to_d2d']}x**"
        if "first_ratio_to_d2d" in sd
        else ""
    )
    rows = [
        (
            "hot swap from a registered host buffer",
            timed("hot_swap", "{:.3f} s", "{} GB/s"),
            f"raw pinned copy {cell('raw_pinned', 'seconds', '{:.3f} s')}: "
            f"**{goals.get('hot_swap_vs_raw_pinned')}x** of it (goal >= 0.95{worker_s('hot_swap')}); "
            "vLLM `wake_up` "
            f"{cell('sleep_wake', 'wake_up_s', '{:.3f} s')} (same weights back): "
            f"**{goals.get('hot_swap_speedup_over_wake_up')}x** faster (goal >= 1.5)",
        ),
        (
            "restore from a page-cached `.thaw`, not registered",
            timed("file_restore", "{:.3f} s"),
            f"goal >= 25 GB/s{worker_s('file_restore')}",
        ),
        (
            "engine cold start from `.thaw` (weight phase: vLLM's model loading minus a dummy "
            "load's)",
            f"{cold['thaw']} s" if cold else "-",
            (
                f"vLLM's safetensors load {cold['normal']} s: "
                f"**{goals.get('cold_start_weight_phase_speedup')}x** (goal >= 4x)"
                if cold
                else f"{goals.get('cold_start_weight_phase_speedup')} (goal >= 4x)"
            ),
        ),
        (
            "state dict from tensors on the same GPU (CUDA IPC)",
            cell("state_dict", "seconds", "{:.4f} s"),
            f"device copy {cell('state_dict', 'd2d_s', '{:.4f} s')}: "
            f"**{goals.get('state_dict_vs_d2d')}x** of it for a trainer's next push of the same "
            f"tensors (goal <= 2x){first_push}",
        ),
        (
            "freeze a live engine to a file",
            timed("freeze", "{:.1f} s"),
            f"goal >= 10 GB/s{freeze_bound}",
        ),
    ]
    lines = [
        f"**Weights** ({source(path, data)}; {data.get('model')}, {gb:.1f} GB; every path's greedy "
        f"tokens identical to the normal load: **{goals.get('greedy_tokens_identical')}**):",
        "",
        "| path | time | against |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def host_paths_table(path: Path, data: dict[str, Any]) -> list[str]:
    """What bounds freeze and restore on a host: file writes and reads, the restore leg."""
    wr = data.get("write_read")
    if not wr:
        return []
    gib = wr["bytes"] / 2**30

    def best(rows: list[dict[str, Any]], folder: str, how: str) -> str:
        got = [r for r in rows if r["folder"] == folder and how in r["how"]]
        top = max(got, key=lambda r: r["gb_per_s"], default=None)
        return (
            f"{top['gb_per_s']} GB/s ({top['threads']} thread{'s' * (top['threads'] > 1)})"
            if top
            else "-"
        )

    lines = [
        f"**Host paths** ({source(path, data)}; `benchmarks/host_paths.py`, {gib:g} GiB, pinned "
        "host memory, no engine; best of the thread counts tried):",
        "",
        "| folder | new file by pwrite | new file by mmap stores | page-cached read by mmap "
        "| page-cached read by preadv |",
        "|---|---|---|---|---|",
    ]
    for folder, fs in wr["fs"].items():
        lines.append(
            f"| `{folder}` ({fs}) | {best(wr['write'], folder, 'pwrite')} | "
            f"{best(wr['write'], folder, 'mmap')} | {best(wr['read'], folder, 'mmap')} | "
            f"{best(wr['read'], folder, 'pread')} |"
        )
    leg = (wr.get("restore_leg") or {}).get("mmap")
    if leg:
        lines += ["", f"The restore leg alone (`StreamScheduler.to_device` from the mmap, CRC32C "
                  f"on the device): {leg['gb_per_s']} GB/s."]  # fmt: skip
    return lines
