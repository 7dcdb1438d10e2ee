"""Time to snapshot and to load a prefix's KV (136 MB and 1 GiB) against recomputing it.

Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, bf16, FlashAttention pages of 16
tokens): KV = 128 KiB per token; 65 blocks = 1040 tokens = 136 MB, 512 blocks = 8192 tokens =
1 GiB. Two parts, one run:

1. data path (``KVTransport`` on a synthetic paged cache, no vLLM): save = kv_gather + device
   CRC32C + D2H into the pinned shared-memory arena + header + commit; load = open + validate
   + H2D + CRC verify + kv_scatter. Medians of several distinct prefixes, with a bit-exact
   round-trip check.
2. in vLLM (0.26 on the lent GPU; separate processes, 8B shapes with dummy weights): process A
   snapshots prefixes through ThawConnector; a fresh process B serves prompt+suffix requests
   that load them (connector-measured load time, TTFT) and requests whose equally long prefix
   is not in the store (recompute TTFT). Skipped when vLLM is missing (``--no-vllm``).

    python benchmarks/kv_transport.py  # -> results/kv_transport_<gpu-slug>.json
                                       #    (e.g. kv_transport_nvidia-h200.json)
Goals (issue 3): load <= 10 ms end-to-end for 136 MB; >= 45 GB/s at 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, device_slug, machine_info, percentiles, write_results  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
SIZES = {"136MB": 65, "1GiB": 512}  # blocks
VOCAB = (1000, 120000)
VLLM_ELEMENT_BYTES = 2  # bf16 KV in the vLLM part
SMOKE = False  # --smoke: the same code on a CPU machine, tiny model and shapes, no JSON


def smoke_mode() -> None:
    global LAYERS, KV_HEADS, HEAD_DIM, BLOCK, SIZES, VOCAB, SMOKE, VLLM_ELEMENT_BYTES
    LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 2, 1, 64, 128  # the tiny model on vLLM-CPU
    SIZES, VOCAB, SMOKE, VLLM_ELEMENT_BYTES = {"small": 4, "large": 16}, (3, 259), True, 4


def make_store(name: str, capacity: int):
    from thaw_agents_core.store.shm import ShmStore

    free = shutil.disk_usage("/dev/shm").free
    if free < capacity + (256 << 20):
        raise SystemExit(
            f"/dev/shm has {free >> 20} MiB free; the benchmark needs {capacity >> 20} MiB"
        )
    if os.path.exists(f"/dev/shm/thaw-{name}"):
        ShmStore.unlink(name)
    return ShmStore(name, capacity, create=True)


# ---------------------------------------------------------------------- part 1: data path


def bench_data_path(reps: int) -> dict:
    from thaw_agents_core.snapshot.namespace import Namespace
    from thaw_agents_core.transport.kv import KVTransport
    from thaw_agents_core.transport.stream_scheduler import StreamScheduler

    device = torch.device("cpu" if SMOKE else "cuda")
    num_blocks = 2048 if not SMOKE else 64
    layers = [
        torch.randint(
            -(2**15),
            2**15,
            (2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM),
            dtype=torch.int16,
            device=device,
        ).view(torch.bfloat16)
        for _ in range(LAYERS)
    ]
    namespace = Namespace(
        model_fingerprint="bench",
        weights_version="",
        dtype="bfloat16",
        kv_cache_dtype="bfloat16",
        layout="cuda",
        block_size=BLOCK,
        num_layers=LAYERS,
        page_shape=(BLOCK, KV_HEADS, HEAD_DIM),
        vllm_version="none",
    )
    block_bytes = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2
    capacity = (reps + 1) * sum(SIZES.values()) * block_bytes + (64 << 20)
    store = make_store("kvbench", capacity)
    copier = StreamScheduler(device)
    register_s = copier.register_host(store.arena_view())
    transport = KVTransport(layers, namespace, store, copier)
    rng = random.Random(0)
    out: dict = {
        "arena_bytes": capacity,
        "register_seconds": register_s,
        "block_bytes": block_bytes,
    }
    for label, n in SIZES.items():
        saves, loads = [], []
        for rep in range(reps + 1):  # rep 0 warms up (allocator, Triton compile)
            tokens = [rng.randrange(*VOCAB) for _ in range(n * BLOCK)]
            src_ids = rng.sample(range(num_blocks), n)
            dst_ids = rng.sample([b for b in range(num_blocks) if b not in set(src_ids)], n)
            if not SMOKE:
                torch.cuda.synchronize()
            began = time.perf_counter()
            ref, stats = transport.save(tokens, src_ids)
            saved = time.perf_counter() - began
            began = time.perf_counter()
            transport.load(ref, 0, n, dst_ids)
            loaded = time.perf_counter() - began  # load() synchronises before returning
            if rep == 0:
                for layer in layers[:: max(1, LAYERS // 4)]:
                    if not torch.equal(
                        layer[:, src_ids].view(torch.int16), layer[:, dst_ids].view(torch.int16)
                    ):
                        raise SystemExit(f"{label}: loaded blocks differ from the saved ones")
                continue
            saves.append(saved)
            loads.append(loaded)
        nbytes = n * block_bytes
        out[label] = {
            "blocks": n,
            "tokens": n * BLOCK,
            "bytes": nbytes,
            "save_seconds": percentiles(saves, digits=None),
            "load_seconds": percentiles(loads, digits=None),
            "save_GBps_p50": nbytes / statistics.median(saves) / 1e9,
            "load_GBps_p50": nbytes / statistics.median(loads) / 1e9,
            "phases_p50_seconds": phase_breakdown(transport, ref, src_ids, dst_ids, reps),
        }
    copier.close()
    store.close()
    return out


def phase_breakdown(transport, ref, src_ids: list[int], dst_ids: list[int], reps: int) -> dict:
    """Each step of a save and a load on its own (synchronised), and the load done serially
    (copy everything, verify, then scatter) against the pipelined ``KVTransport.load``.

    The raw copies between the arena (or a fresh pinned tensor) and the device are the
    ceiling the load and save paths are measured against.
    """
    from thaw_agents_core.transport.stream_scheduler import as_uint8_tensor
    from thaw_kernels import kv_gather, kv_scatter

    store, copier, layers, spec = (
        transport.store,
        transport.copier,
        transport.layers,
        transport.spec,
    )
    device = layers[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    view = store.open(ref)
    arena = as_uint8_tensor(view.payload)
    nbytes = arena.numel()
    chunk_bytes = view.header.blocks_per_chunk * view.header.block_bytes
    staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    pinned.copy_(arena)
    blocks = transport._blocks_view(staging, len(dst_ids))

    def serial_load() -> None:
        with store.open(ref) as v:
            crcs = copier.to_device(v.payload, staging, chunk_bytes).tolist()
            if crcs != v.header.chunk_crc32c:
                raise SystemExit("serial load: CRC mismatch")
            kv_scatter(blocks, layers, dst_ids, spec)
            sync()

    steps = {
        "open_header": lambda: store.open(ref).close(),
        "h2d_arena_raw": lambda: staging.copy_(arena, non_blocking=True),
        "h2d_pinned_raw": lambda: staging.copy_(pinned, non_blocking=True),
        "h2d_arena_with_crc": lambda: copier.to_device(view.payload, staging, chunk_bytes).tolist(),
        "scatter": lambda: kv_scatter(blocks, layers, dst_ids, spec),
        "load_serial": serial_load,
        "load_pipelined": lambda: transport.load(ref, 0, len(dst_ids), dst_ids),
        "gather": lambda: kv_gather(layers, src_ids, spec),
        "d2h_pinned_raw": lambda: pinned.copy_(staging, non_blocking=True),
    }
    result = {}
    for name, step in steps.items():
        times = []
        for rep in range(reps + 1):
            sync()
            began = time.perf_counter()
            step()
            sync()
            if rep:
                times.append(time.perf_counter() - began)
        result[name] = statistics.median(times)
    view.close()
    result["GBps"] = {k: nbytes / v / 1e9 for k, v in result.items() if k != "open_header"}
    return result


# ---------------------------------------------------------------------- part 2: in vLLM


# How process B checks a snapshot's bytes before vLLM may load it (connector/verifier.py), each
# in its own process B of the same run: "prefetch" (the CUDA default: a copy verified on the
# device, the load scatters it), "host-check" (a host CRC pass first, the previous default)
# and "on-copy" (header check only; the worker verifies each chunk as it copies it).
VERIFY_MODES = {
    "prefetch": {},
    "host-check": {"verify_payload": True, "device_prefetch_bytes": 0},
    "on-copy": {"verify_payload": False},
}


GRAPHS = "+graphs"  # a mode's suffix: the same engine with CUDA graphs and torch.compile


def all_modes() -> list[str]:
    return [*VERIFY_MODES, *(m + GRAPHS for m in VERIFY_MODES)]


def engine(store_url: str | None, events: str | None, mode: str = "prefetch"):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from thaw_agents_core.connector.facade import kv_transfer_config
    from thaw_agents_core.engine.models import tiny_model_path
    from thaw_agents_core.testing import llama_8b_shaped_path

    kwargs = {}
    if store_url:
        config = kv_transfer_config(store_url, events_path=events)
        config["kv_connector_extra_config"].update(VERIFY_MODES[mode.removesuffix(GRAPHS)])
        kwargs["kv_transfer_config"] = KVTransferConfig(**config)
    if SMOKE:
        return LLM(
            model=str(tiny_model_path()),
            dtype="float32",
            enforce_eager=True,
            disable_log_stats=False,
            max_model_len=4096,
            kv_cache_memory_bytes=256 << 20,
            **kwargs,
        )
    return LLM(
        model=str(llama_8b_shaped_path()),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=not mode.endswith(GRAPHS),
        disable_log_stats=False,  # RequestOutput.metrics: the engine core's timestamps
        max_model_len=8192 + 64,
        gpu_memory_utilization=0.5,
        **kwargs,
    )


def prefixes(reps: int) -> dict[str, list[list[int]]]:
    rng = random.Random(1)
    return {
        label: [[rng.randrange(*VOCAB) for _ in range(n * BLOCK)] for _ in range(reps + 1)]
        for label, n in SIZES.items()
    }


def corrupt_prompt() -> list[int]:
    """A prefix whose snapshot gets one flipped payload byte between process A and B."""
    rng = random.Random(3)
    return [rng.randrange(*VOCAB) for _ in range(min(SIZES.values()) * BLOCK)]


def role_a(store_url: str, events: str, reps: int) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(store_url, events)
    save = SamplingParams(
        max_tokens=1, detokenize=False, extra_args={"kv_transfer_params": {"thaw": {"save": True}}}
    )
    for label, prompts in prefixes(reps).items():
        for tokens in prompts:
            out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], save, use_tqdm=False)[0]
            snap = (out.kv_transfer_params or {}).get("thaw", {}).get("snapshot") or {}
            if not snap.get("ok"):
                raise SystemExit(f"A: snapshot of {label} failed: {snap}")
    out = llm.generate([TokensPrompt(prompt_token_ids=corrupt_prompt())], save, use_tqdm=False)[0]
    print("CORRUPT " + json.dumps(out.kv_transfer_params["thaw"]["snapshot"]), flush=True)
    print("A done", flush=True)


def role_b(store_url: str, events: str, reps: int, mode: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(store_url, events, mode)
    one = SamplingParams(max_tokens=1, detokenize=False)
    rng = random.Random(2)
    # The corrupted snapshot first: refused before any byte is loaded, the prompt computed.
    suffix = [rng.randrange(*VOCAB) for _ in range(16)]
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=corrupt_prompt() + suffix)], one, use_tqdm=False
    )[0]
    result: dict = {"corrupted": {"num_cached_tokens": out.num_cached_tokens}}
    for label, prompts in prefixes(reps).items():
        loaded, recomputed, cached = [], [], []
        spans: dict[str, dict[str, list[float]]] = {"load": {}, "recompute": {}}
        for i, tokens in enumerate(prompts):
            suffix = [rng.randrange(*VOCAB) for _ in range(16)]
            fresh = [rng.randrange(*VOCAB) for _ in range(len(tokens))]
            for kind, prompt in (("load", tokens + suffix), ("recompute", fresh + suffix)):
                began = time.perf_counter()
                out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], one, use_tqdm=False)[0]
                seconds = time.perf_counter() - began
                if i == 0:
                    continue  # warm-up
                (loaded if kind == "load" else recomputed).append(seconds)
                for name, value in core_spans(out, seconds).items():
                    spans[kind].setdefault(name, []).append(value)
                if kind == "load":
                    cached.append(out.num_cached_tokens)
        result[label] = {
            "ttft_load_seconds": percentiles(loaded, digits=None),
            "ttft_recompute_seconds": percentiles(recomputed, digits=None),
            "num_cached_tokens": cached,
            "engine_core_spans_p50_seconds": {
                kind: {name: statistics.median(v) for name, v in d.items()}
                for kind, d in spans.items()
            },
        }
    print("B " + json.dumps(result), flush=True)


def core_spans(out: object, seconds: float) -> dict[str, float]:
    """Where a request's time went inside the engine core (vLLM's RequestStateStats, monotonic):
    queued -> first scheduled (the connector's lookups and checks, the wait for the load) ->
    first token (the forward pass over the suffix); the rest of ``seconds`` (the call's wall
    time) is outside the core: the frontend, IPC, detokenizing. {} without stats."""
    m = getattr(out, "metrics", None)
    ts = [getattr(m, k, 0.0) for k in ("queued_ts", "scheduled_ts", "first_token_ts")]
    if not all(ts):
        return {}
    return {
        "queued_to_scheduled": ts[1] - ts[0],
        "scheduled_to_first_token": ts[2] - ts[1],
        "outside_core": seconds - (ts[2] - ts[0]),
    }


def bench_vllm(reps: int, workdir: Path, modes: list[str]) -> dict:
    n_bytes = (
        (reps + 1)
        * sum(SIZES.values())
        * LAYERS
        * 2
        * BLOCK
        * KV_HEADS
        * HEAD_DIM
        * VLLM_ELEMENT_BYTES
    )
    store = make_store("kvbench-vllm", n_bytes + (256 << 20))
    url = "shm://kvbench-vllm"
    ttft: dict[str, dict] = {}

    def run(role: str, events: str, mode: str) -> str:
        argv = [sys.executable, __file__, "--role", role, "--store", url, "--events", events]
        argv += ["--reps", str(reps), "--verify", mode] + (["--smoke"] if SMOKE else [])
        proc = subprocess.run(argv, text=True, capture_output=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"role {role} ({mode}) failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return proc.stdout

    try:
        stdout = run("A", str(workdir / "events_A.jsonl"), "prefetch")
        corrupted = json.loads(next(x for x in stdout.splitlines() if x.startswith("CORRUPT "))[8:])
        from thaw_agents_core.store.base import SnapshotRef
        from thaw_agents_core.testing import flip_payload_bit

        flip_payload_bit(
            store,
            SnapshotRef(corrupted["namespace_key"], corrupted["snapshot_id"]),
            lambda header: header.payload_bytes // 2 + 7,
        )
        for mode in modes:
            stdout = run("B", str(workdir / f"events_B_{mode}.jsonl"), mode)
            line = next(x for x in stdout.splitlines() if x.startswith("B "))
            ttft[mode] = json.loads(line[2:])
    finally:
        store.close()
    saved = [json.loads(x) for x in (workdir / "events_A.jsonl").read_text().splitlines()]
    out: dict = {"default_mode": modes[0], "modes": {}}
    for mode in modes:
        log = [json.loads(x) for x in (workdir / f"events_B_{mode}.jsonl").read_text().splitlines()]
        per_size: dict = {}
        for label, n in SIZES.items():
            nbytes = n * LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * VLLM_ELEMENT_BYTES
            saves = [e["seconds"] for e in saved if e["event"] == "save" and e["bytes"] == nbytes]
            mine = [e for e in log if e["event"] == "load" and e["bytes"] == nbytes][1:]
            loads = [e["seconds"] for e in mine]
            row = {
                "connector_save_seconds": percentiles(saves[1:], digits=None),
                "connector_load_seconds": percentiles(loads, digits=None),
                "connector_load_GBps_p50": nbytes / statistics.median(loads) / 1e9,
                "loads_prefetched": sum(bool(e.get("prefetched")) for e in mine),
                "loads": len(mine),
                "failures": [e for e in log if e["event"].endswith(("_failed", "_refused"))],
                **ttft[mode][label],
            }
            row["ttft_speedup_p50"] = (
                row["ttft_recompute_seconds"]["p50"] / row["ttft_load_seconds"]["p50"]
            )
            row["ttft_ratio_p50"] = 1 / row["ttft_speedup_p50"]
            per_size[label] = row
        bad = corrupted["snapshot_id"]
        per_size["corrupted"] = {
            **ttft[mode].pop("corrupted"),
            "refused": [
                e["error"][:200]
                for e in log
                if e["event"] == "load_refused" and e["snapshot_id"] == bad
            ],
            "failed_loads": sum(
                e["event"] == "load_failed" and e["snapshot_id"] == bad for e in log
            ),
            "loads": sum(e["event"] == "load" and e["snapshot_id"] == bad for e in log),
        }
        c = per_size["corrupted"]
        c["outcome"] = (
            "LOADED"  # never acceptable: bad bytes reached the cache
            if c["loads"]
            else "refused before loading, prompt computed"
            if c["refused"] and c["num_cached_tokens"] == 0
            else "load failed its checksums, vLLM recomputed"
            if c["failed_loads"]
            else "not looked up"
        )
        out["modes"][mode] = per_size
    out.update(out["modes"][modes[0]])  # the default mode's figures at the top level, as before
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--role", choices=["A", "B"])
    parser.add_argument("--store")
    parser.add_argument("--events")
    parser.add_argument("--verify", choices=all_modes(), default="prefetch")
    parser.add_argument(
        "--modes",
        default="prefetch,prefetch+graphs",
        help="verify modes of process B, compared in one run (the first is reported on top); "
        "+graphs: with CUDA graphs",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same code on a CPU machine (tiny model and shapes, no JSON)",
    )
    args = parser.parse_args()
    if args.smoke:
        smoke_mode()
    if args.role:
        if args.role == "A":
            role_a(args.store, args.events, args.reps)
        else:
            role_b(args.store, args.events, args.reps, args.verify)
        return 0
    if not torch.cuda.is_available() and not SMOKE:
        print("kv_transport: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    result = {
        "machine": machine_info(),
        "reps": args.reps,
        "goals": {"load_136MB_seconds_max": 0.010, "load_1GiB_GBps_min": 45.0},
        "shape": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK,
            "dtype": "bfloat16",
        },
    }
    result["data_path"] = bench_data_path(args.reps)
    if not args.no_vllm:
        workdir = Path(os.environ.get("OUT", "/tmp")) / "kv_transport"
        workdir.mkdir(parents=True, exist_ok=True)
        for old in workdir.glob("events*.jsonl"):
            old.unlink()
        modes = [m for m in args.modes.split(",") if m]
        unknown = sorted(set(modes) - set(all_modes()))
        if unknown:
            parser.error(f"unknown --modes {unknown}; valid: {all_modes()}")
        result["vllm"] = bench_vllm(args.reps, workdir, modes)
    if SMOKE:
        print(json.dumps(result, indent=1))
        return 0
    path = write_results(RESULTS / f"kv_transport_{device_slug()}.json", result)
    for label in SIZES:
        d = result["data_path"][label]
        print(
            f"{label:6} data path: save {d['save_seconds']['p50'] * 1e3:7.2f} ms "
            f"({d['save_GBps_p50']:5.1f} GB/s)  load {d['load_seconds']['p50'] * 1e3:7.2f} ms "
            f"({d['load_GBps_p50']:5.1f} GB/s)"
        )
        print(
            "        phases: "
            + ", ".join(
                f"{k} {v * 1e3:.2f} ms" for k, v in d["phases_p50_seconds"].items() if k != "GBps"
            )
        )
        if "vllm" in result:
            v = result["vllm"][label]
            for mode, per_size in result["vllm"]["modes"].items():
                v = per_size[label]
                print(
                    f"{label:6} vLLM ({mode}): connector load "
                    f"{v['connector_load_seconds']['p50'] * 1e3:7.2f} ms; TTFT load "
                    f"{v['ttft_load_seconds']['p50'] * 1e3:7.1f} ms vs recompute "
                    f"{v['ttft_recompute_seconds']['p50'] * 1e3:7.1f} ms "
                    f"({v['loads_prefetched']}/{v['loads']} prefetched)"
                )
    for mode, per_size in result.get("vllm", {}).get("modes", {}).items():
        print(f"corrupted snapshot ({mode}): {per_size['corrupted']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
