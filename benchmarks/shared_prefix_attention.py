"""Benchmark shared-prefix (cascade) decode attention against per-branch attention.

    python3 benchmarks/shared_prefix_attention.py            # CUDA: writes
        benchmarks/results/shared_prefix_attention_<gpu-slug>.json
    .venv/bin/python benchmarks/shared_prefix_attention.py --smoke --out /tmp/spa.json
        # CPU: tiny shapes through the reference path (checks the script, not speed)

Workload: one layer of Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128, bf16,
block_size 16, flash layout), B decode queries whose branches share an 8192-token prefix and
each own a ``--tail``-token tail (default 128), blocks at random positions of the cache;
B in {4, 16, 64, 256}. Rows per B:

- ``ours``: :func:`thaw_kernels.shared_prefix_attention` with a prebuilt plan (``plan_ms``: the
  host cost of building it, once per batch); ``variants``: other chunk lengths / BLOCK_M.
- ``flash_varlen``: vLLM's flash-attn paged decode (``vllm.vllm_flash_attn``), one block table
  per branch (prefix + tail), reading the prefix once per branch; "unavailable" without vLLM.
- ``sdpa``: torch SDPA (enable_gqa) on KV gathered per branch beforehand (gather not timed).
- ``floor_ms``: bytes read once (prefix KV + tails' KV + q + out) at the D2D copy rate measured in
  the same run (1 GiB copy, read + write bytes); ``per_branch_floor_ms`` the same for B prefixes.

Timing: triton.testing.do_bench (L2 flushed before each call), p20/p50/p80 via _common. Every
output's max abs difference is against the fp32 reference on the same bf16 inputs; ``ok`` when
under 2e-2. Each part runs in its own try/except: an error is recorded, the rest still runs.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from _common import RESULTS, device_slug, machine_info, percentiles, write_results

from thaw_kernels import Segment, plan_segments, shared_prefix_attention
from thaw_kernels import shared_prefix_attention_reference as reference

TOL = 2e-2


def timed(fn: Callable[[], Any], cuda: bool) -> dict[str, float]:
    """p20/p50/p80 ms of ``fn`` (do_bench on CUDA, perf_counter on CPU)."""
    if cuda:
        import triton

        times = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="all")
    else:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return percentiles(times, digits=4)


def copy_rate(cuda: bool, nbytes: int) -> dict[str, float]:
    """Device-to-device copy: read + written bytes per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), cuda)
    return {"bytes": nbytes, "ms": t, "moved_GBps": round(2 * nbytes / t["p50"] / 1e6, 1)}


def make_batch(b: int, args, device: str, gen: torch.Generator):
    bs, kvh, hd = args.block_size, args.kv_heads, args.head_dim
    pre_blocks, tail_blocks = -(-args.prefix // bs), -(-args.tail // bs)
    total = pre_blocks + b * tail_blocks
    ids = torch.randperm(total + 16, generator=gen)[:total].to(torch.int32)
    shape = (total + 16, bs, kvh, hd)
    kc = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
    vc = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
    q = torch.randn(b, kvh * args.group, hd, generator=gen).to(device, torch.bfloat16)
    prefix = ids[:pre_blocks]
    tails = ids[pre_blocks:].view(b, tail_blocks)
    segs = [Segment(prefix, args.prefix, list(range(b)))]
    segs += [Segment(tails[i], args.tail, [i]) for i in range(b)]
    flat_tables = torch.cat([prefix.expand(b, -1), tails], dim=1)
    return q, kc, vc, segs, flat_tables


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max())


def bench_one(b: int, args, cuda: bool, rate: float | None, gen) -> dict[str, Any]:
    device = "cuda" if cuda else "cpu"
    row: dict[str, Any] = {"B": b, "errors": {}}
    q, kc, vc, segs, flat = make_batch(b, args, device, gen)
    scale = args.head_dim**-0.5
    seq = args.prefix + args.tail
    want = reference(q.float(), kc.float(), vc.float(), segs, scale)

    def part(name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - record and carry on
            row["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()

    def ours() -> None:
        t = time.perf_counter()
        plan = plan_segments(segs, b, q.shape[1], args.kv_heads, args.block_size, device)
        row["plan_ms"] = round((time.perf_counter() - t) * 1e3, 3)
        out = shared_prefix_attention(q, kc, vc, plan, scale)
        row["ours"] = {"ms": timed(lambda: shared_prefix_attention(q, kc, vc, plan, scale), cuda)}
        row["ours"]["max_abs_diff"] = max_diff(out, want)
        row["ours"]["ok"] = row["ours"]["max_abs_diff"] < TOL
        row["ours"]["launches"] = [[bm, t.shape[0]] for bm, t in plan.launches]
        row["ours"]["pairs"] = plan.num_pairs

    def variants() -> None:
        if not cuda:
            return
        row["variants"] = {}
        for chunk, bm in [(512, None), (1024, None), (2048, None), (None, 64), (4096, None)]:
            plan = plan_segments(
                segs, b, q.shape[1], args.kv_heads, args.block_size, device, chunk, bm
            )

            def call(p=plan):
                return shared_prefix_attention(q, kc, vc, p, scale)

            out = call()
            row["variants"][f"chunk={chunk},block_m={bm}"] = {
                "p50_ms": timed(call, True)["p50"],
                "max_abs_diff": max_diff(out, want),
            }

    def flash() -> None:
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func
        except Exception as exc:  # noqa: BLE001
            row["flash_varlen"] = {"unavailable": f"{type(exc).__name__}: {exc}"}
            return
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=device)
        seqused = torch.full((b,), seq, dtype=torch.int32, device=device)
        table = flat.to(device)

        def call():
            return flash_attn_varlen_func(
                q=q,
                k=kc,
                v=vc,
                cu_seqlens_q=cu_q,
                max_seqlen_q=1,
                seqused_k=seqused,
                max_seqlen_k=seq,
                softmax_scale=scale,
                causal=True,
                block_table=table,
            )

        out = call()
        row["flash_varlen"] = {"ms": timed(call, cuda), "max_abs_diff": max_diff(out, want)}
        row["flash_varlen"]["ok"] = row["flash_varlen"]["max_abs_diff"] < TOL

    def sdpa() -> None:
        ids = flat.to(device).long()
        k = kc[ids].flatten(1, 2)[:, :seq].transpose(1, 2).contiguous()  # [B, kvh, T, D]
        v = vc[ids].flatten(1, 2)[:, :seq].transpose(1, 2).contiguous()
        qs = q[:, :, None, :]

        def call():
            return F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)

        out = call()[:, :, 0]
        row["sdpa"] = {"ms": timed(call, cuda), "max_abs_diff": max_diff(out, want)}
        row["sdpa"]["ok"] = row["sdpa"]["max_abs_diff"] < TOL

    for name, body in [("ours", ours), ("variants", variants), ("flash", flash), ("sdpa", sdpa)]:
        part(name, body)
    kv_token = 2 * args.kv_heads * args.head_dim * 2  # K + V bytes of one token
    qo = 2 * q.numel() * 2
    once = args.prefix * kv_token + b * args.tail * kv_token + qo
    per_branch = b * seq * kv_token + qo
    row["bytes_once"], row["bytes_per_branch"] = once, per_branch
    if rate:
        row["floor_ms"] = round(once / rate / 1e6, 5)
        row["per_branch_floor_ms"] = round(per_branch / rate / 1e6, 5)
    ours_ms = row.get("ours", {}).get("ms", {}).get("p50")
    for other in ("flash_varlen", "sdpa"):
        other_ms = row.get(other, {}).get("ms", {}).get("p50")
        if ours_ms and other_ms:
            row[f"speedup_vs_{other}"] = round(other_ms / ours_ms, 2)
    if ours_ms and rate:
        row["floor_over_ours"] = round(row["floor_ms"] / ours_ms, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, reference path")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--tail", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.prefix, args.tail, args.kv_heads, args.group, args.head_dim = (
            40,
            args.tail or 5,
            2,
            4,
            16,
        )
        args.block_size, batches, copy_bytes = 4, [2, 3], 1 << 20
    else:
        args.prefix, args.tail, args.kv_heads, args.group, args.head_dim = (
            8192,
            args.tail or 128,
            8,
            4,
            128,
        )
        args.block_size, batches, copy_bytes = 16, [4, 16, 64, 256], 1 << 30
    slug = device_slug() if cuda else "cpu"
    out_path = args.out or RESULTS / f"shared_prefix_attention_{slug}.json"
    payload: dict[str, Any] = {
        "benchmark": "shared_prefix_attention",
        "machine": machine_info(),
        "config": {
            "num_q_heads": args.kv_heads * args.group,
            "num_kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
            "dtype": "bfloat16",
            "prefix_tokens": args.prefix,
            "tail_tokens": args.tail,
            "smoke": args.smoke,
            "timer": "triton.testing.do_bench p20/p50/p80 ms" if cuda else "perf_counter",
        },
        "results": [],
        "errors": {},
    }
    start = time.perf_counter()
    rate = None
    try:
        payload["copy"] = copy_rate(cuda, copy_bytes)
        rate = payload["copy"]["moved_GBps"]
    except Exception as exc:  # noqa: BLE001
        payload["errors"]["copy"] = f"{type(exc).__name__}: {exc}"
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        try:
            row = bench_one(b, args, cuda, rate, gen)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row = {"B": b, "errors": {"setup": f"{type(exc).__name__}: {exc}"}}
        payload["results"].append(row)
        print({k: v for k, v in row.items() if k != "variants"}, flush=True)
        if cuda:
            torch.cuda.empty_cache()
    payload["wall_s"] = round(time.perf_counter() - start, 1)
    print("wrote", write_results(out_path, payload))


if __name__ == "__main__":
    main()
