"""Benchmark thaw_kernels: KV gather/scatter and chunk CRC32C against a device-to-device copy.

    .venv/bin/python benchmarks/kernels.py               # CUDA: sweeps tile variants, writes
                                                         #   benchmarks/results/kernels_<gpu-slug>.json
    .venv/bin/python benchmarks/kernels.py --write-cpu   # CPU: small shapes, reference paths,
                                                         #   writes kernels_cpu.json (only with the flag)
    .venv/bin/python benchmarks/kernels.py --dry-run     # CPU: the CUDA code path with tiny shapes under
                                                         #   TRITON_INTERPRET=1 (checks the script, not speed)

Workload (CUDA): Llama-3.1-8B KV shapes (32 layers, 8 KV heads, head_dim 128, block_size 16, bf16,
flash layout, one allocation per layer as vLLM makes them) in a cache of 2048 blocks (4 GiB);
65 blocks (136 MB) and 512 blocks (1.07 GB) at random positions in it.

Byte counting: ``payload_GBps`` = bytes of KV copied (or checksummed) per second. ``moved_GBps``
counts bytes read + written, like LIMITS.md's 3.0 TB/s device-to-device figure: 2 x payload for
copies, 1 x payload for CRC (read only). ``vs_d2d`` = D2D copy time of the same payload / op time.

Timing: triton.testing.do_bench (warm-up, L2 flushed before every call), p20/p50/p80 over ~100 ms of
calls; each call also rotates through 3 buffers / block-id sets so repeats never hit a warm L2.
Every variant's output is checked against the torch reference before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

from thaw_kernels import chunk_crc32c, chunk_crc32c_reference, kv_gather_reference, page_spec_for
from thaw_kernels import crc32c as crc_mod
from thaw_kernels import kv_blocks as kv_mod

RESULTS = Path(__file__).parent / "results"
GOALS = {"gather_scatter_vs_d2d": 0.80, "crc_payload_GBps": 500.0}
ROTATE = 3


def timer_cuda(fns: list) -> tuple[float, float, float]:
    it = itertools.cycle(fns)
    p50, p20, p80 = triton.testing.do_bench(lambda: next(it)(), warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def timer_cpu(fns: list, reps: int = 15) -> tuple[float, float, float]:
    times = []
    for fn in itertools.islice(itertools.cycle(fns), reps + 2):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times[2:], n=10)
    return statistics.median(times[2:]), q[1], q[7]


class Table:
    def __init__(self, timer):
        self.timer, self.rows, self.d2d_ms = timer, [], {}

    def add(self, op: str, variant: str, size: str, payload: int, fns: list, moved_factor: int, ok: bool = True):
        p50, p20, p80 = self.timer(fns)
        if op == "d2d_copy":
            self.d2d_ms[size] = p50
        row = dict(op=op, variant=variant, size=size, payload_bytes=payload, ok=ok, ms_p50=round(p50, 4),
                   ms_p20=round(p20, 4), ms_p80=round(p80, 4), payload_GBps=round(payload / p50 / 1e6, 1),
                   moved_GBps=round(moved_factor * payload / p50 / 1e6, 1))
        if size in self.d2d_ms and op != "d2d_copy":
            row["vs_d2d"] = round(self.d2d_ms[size] / p50, 3)
        self.rows.append(row)
        print(f"  {op:<14} {size:<22} {variant:<40} {p50:8.3f} ms  {row['moved_GBps']:8.1f} GB/s moved"
              + ("" if ok else "  WRONG RESULT"), flush=True)
        return row


def random_cache(n_layers, num_blocks, block_size, kv_heads, head_dim, device):
    layers = []
    for _ in range(n_layers):  # one allocation per layer, as vLLM's GPU model runner does
        t = torch.empty(2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device)
        t.view(torch.int16).random_(-(2**15), 2**15 - 1)
        layers.append(t)
    return layers


def bench_kv(table: Table, device, shape: dict, sizes: list[int], variants: list[tuple[int, int]]):
    layers = random_cache(shape["layers"], shape["cache_blocks"], shape["block_size"], shape["kv_heads"],
                          shape["head_dim"], device)
    spec = page_spec_for(layers[0], "flash")
    bufs = {}
    for n in sizes:
        out_shape = (n, len(layers), 2, spec.page_elems)
        payload = n * len(layers) * 2 * spec.page_elems * 2
        size = f"{n} blk ({payload / 1e6:.0f} MB)"
        ids = [torch.randperm(spec.num_blocks)[:n].tolist() for _ in range(ROTATE)]
        outs = [torch.empty(out_shape, dtype=torch.bfloat16, device=device) for _ in range(ROTATE)]
        src = [torch.empty_like(o).view(torch.int16).random_(-(2**15), 2**15 - 1).view(torch.bfloat16)
               for o in outs]
        table.add("d2d_copy", "dst.copy_(src)", size, payload,
                  [lambda o=o, s=s: o.copy_(s) for o, s in zip(outs, src)], 2)
        ref = kv_gather_reference(layers, ids[0], spec)
        table.add("gather", "torch reference (index_select per layer)", size, payload,
                  [lambda i=i, o=o: kv_gather_reference(layers, i, spec, out=o) for i, o in zip(ids, outs)], 2)
        for block_bytes, warps in variants:
            tile = dict(block=block_bytes // 2, num_warps=warps)
            name = f"triton block={block_bytes}B warps={warps}"
            outs[0].view(torch.int16).fill_(0x5A5A)  # earlier runs left the right answer there
            got = kv_mod._kv_gather_triton(layers, ids[0], spec, outs[0], **tile)
            ok = torch.equal(got.view(torch.int16), ref.view(torch.int16))
            fns = [lambda i=i, o=o: kv_mod._kv_gather_triton(layers, i, spec, o, **tile) for i, o in zip(ids, outs)]
            table.add("gather", name, size, payload, fns, 2, ok)
        table.add("scatter", "torch reference (index_copy_ per layer)", size, payload,
                  [lambda i=i, s=s: kv_mod.kv_scatter_reference(s, layers, i, spec) for i, s in zip(ids, src)], 2)
        for block_bytes, warps in variants:
            tile = dict(block=block_bytes // 2, num_warps=warps)
            name = f"triton block={block_bytes}B warps={warps}"
            probe = torch.empty_like(src[0]).view(torch.int16).random_(-(2**15), 2**15 - 1)  # not yet in the cache
            kv_mod._kv_scatter_triton(probe.view(torch.bfloat16), layers, ids[0], spec, **tile)
            ok = torch.equal(kv_gather_reference(layers, ids[0], spec).view(torch.int16), probe)
            fns = [lambda i=i, s=s: kv_mod._kv_scatter_triton(s, layers, i, spec, **tile) for i, s in zip(ids, src)]
            table.add("scatter", name, size, payload, fns, 2, ok)
        bufs[size] = (payload, [o.view(torch.uint8).flatten() for o in src])
    del layers
    return bufs


def bench_crc(table: Table, bufs: dict, chunk_bytes: int, variants: list[dict]):
    """variants == []: the public CPU path."""
    for size, (payload, buffers) in bufs.items():
        ref = chunk_crc32c_reference(buffers[0], chunk_bytes)
        label = f"{size} chunk={chunk_bytes >> 10}K"
        if not variants:
            table.add("crc32c", "cpu path (libcrc32c)", label, payload,
                      [lambda b=b: chunk_crc32c(b, chunk_bytes) for b in buffers], 1)
            continue
        for cfg in variants:
            name = "triton " + " ".join(f"{k}={v}" for k, v in cfg.items())
            ok = torch.equal(crc_mod._chunk_crc32c_triton(buffers[0], chunk_bytes, **cfg), ref)
            table.add("crc32c", name, label, payload,
                      [lambda b=b: crc_mod._chunk_crc32c_triton(b, chunk_bytes, **cfg) for b in buffers], 1, ok)


def best(rows, op, size_prefix=None):
    cands = [r for r in rows if r["op"] == op and r["ok"] and r["variant"].startswith("triton")
             and (size_prefix is None or r["size"].startswith(size_prefix))]
    return max(cands, key=lambda r: r["payload_GBps"]) if cands else None


def plan(args) -> dict:
    """What to run: the H100 sweep, the CPU smoke run, or the interpreter dry run of the former."""
    kv_default = (kv_mod.DEFAULT_BLOCK_BYTES, kv_mod.DEFAULT_NUM_WARPS)
    crc_default = dict(lanes=crc_mod.DEFAULT_LANES, piece_bytes=crc_mod.DEFAULT_PIECE_BYTES,
                       table_bits=crc_mod.DEFAULT_TABLE_BITS, num_warps=crc_mod.DEFAULT_NUM_WARPS)
    if args.dry_run:
        return dict(name="cpu-interpreter-dry-run", device=torch.device("cpu"),
                    timer=lambda fns: timer_cpu(fns, reps=2), sizes=[3, 5], crc_chunk=1024,
                    shape=dict(layers=2, kv_heads=2, head_dim=8, block_size=4, cache_blocks=16, dtype="bfloat16"),
                    kv_variants=[(256, 4), (64, 8)],
                    crc_variants=[dict(lanes=16, piece_bytes=256, table_bits=4, num_warps=4),
                                  dict(lanes=8, piece_bytes=128, table_bits=8, num_warps=8, data_cache=".cg")])
    if not torch.cuda.is_available():
        return dict(name="cpu", device=torch.device("cpu"), timer=timer_cpu, sizes=[8, 64], crc_chunk=1 << 20,
                    shape=dict(layers=4, kv_heads=2, head_dim=64, block_size=16, cache_blocks=256, dtype="bfloat16"),
                    kv_variants=[], crc_variants=[])
    kv_variants, crc_variants = [kv_default], [crc_default]
    if not args.quick:
        kv_variants += [(b, w) for b in (4096, 8192, 16384, 32768) for w in (4, 8) if (b, w) != kv_default]
        crc_variants += [v for v in (dict(lanes=ln, piece_bytes=pc, table_bits=tb, num_warps=w)
                                     for tb in (4, 8) for ln in (512, 1024, 2048) for pc in (65536, 262144)
                                     for w in (4, 8)) if v != crc_default]
        crc_variants.append({**crc_default, "data_cache": ".cg"})
    return dict(name=torch.cuda.get_device_name(), device=torch.device("cuda"), timer=timer_cuda, sizes=[65, 512],
                crc_chunk=1 << 20, kv_variants=kv_variants, crc_variants=crc_variants,
                shape=dict(layers=32, kv_heads=8, head_dim=128, block_size=16, cache_blocks=2048, dtype="bfloat16"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-cpu", action="store_true", help="on CPU, also write results/kernels_cpu.json")
    ap.add_argument("--quick", action="store_true", help="CUDA: defaults only, no variant sweep")
    ap.add_argument("--dry-run", action="store_true", help="run the CUDA code path on CPU under the interpreter")
    args = ap.parse_args()
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter is chosen when kernels are decorated: restart with it on from the start.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    t0 = time.perf_counter()
    cfg = plan(args)
    name, device, sizes, shape = cfg["name"], cfg["device"], cfg["sizes"], cfg["shape"]
    cuda = device.type == "cuda"
    table = Table(cfg["timer"])
    print(f"thaw_kernels benchmark on {name} (torch {torch.__version__}, triton {triton.__version__})")
    bufs = bench_kv(table, device, shape, sizes, cfg["kv_variants"])
    big = list(bufs)[-1]
    # Sweep the CRC variants on the largest buffer; the smaller one runs the default only.
    bench_crc(table, {k: v for k, v in bufs.items() if k != big}, cfg["crc_chunk"], cfg["crc_variants"][:1])
    bench_crc(table, {big: bufs[big]}, cfg["crc_chunk"], cfg["crc_variants"])

    summary = {}
    for op in ("gather", "scatter", "crc32c"):
        b = best(table.rows, op, f"{sizes[-1]} blk")
        if b:
            summary[op] = {k: b[k] for k in ("variant", "size", "payload_GBps", "moved_GBps") if k in b}
            summary[op]["vs_d2d"] = b.get("vs_d2d")
    if cuda:
        summary["goals_met"] = {
            op: summary.get(op, {}).get(key) is not None and summary[op][key] >= GOALS[goal]
            for op, key, goal in (("gather", "vs_d2d", "gather_scatter_vs_d2d"),
                                  ("scatter", "vs_d2d", "gather_scatter_vs_d2d"),
                                  ("crc32c", "payload_GBps", "crc_payload_GBps"))}
    result = dict(
        device=name, torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), shapes=dict(shape, gathered_blocks=sizes),
        byte_counting="payload_GBps = payload bytes / s; moved_GBps = bytes read + written / s (2x payload for "
                      "copies, 1x for CRC, read only); vs_d2d = d2d copy time of the same payload / op time",
        timing="triton.testing.do_bench, L2 flushed per call, 3 rotating buffers" if cuda else "perf_counter",
        variants_tried=dict(kv=[dict(block_bytes=b, num_warps=w) for b, w in cfg["kv_variants"]],
                            crc32c=cfg["crc_variants"]),
        goals=GOALS, kernel_defaults=dict(kv_block_bytes=kv_mod.DEFAULT_BLOCK_BYTES,
                                          kv_num_warps=kv_mod.DEFAULT_NUM_WARPS,
                                          crc_lanes=crc_mod.DEFAULT_LANES, crc_piece_bytes=crc_mod.DEFAULT_PIECE_BYTES,
                                          crc_table_bits=crc_mod.DEFAULT_TABLE_BITS,
                                          crc_num_warps=crc_mod.DEFAULT_NUM_WARPS),
        summary=summary, rows=table.rows, wall_s=round(time.perf_counter() - t0, 1))

    print(f"\n{'op':<9} {'size':<22} {'best variant':<52} {'GB/s payload':>12} {'GB/s moved':>11} {'vs d2d':>7}")
    for op in ("d2d_copy", "gather", "scatter", "crc32c"):
        for size in dict.fromkeys(r["size"] for r in table.rows if r["op"] == op):
            rows = [r for r in table.rows if r["op"] == op and r["size"] == size and r["ok"]]
            r = max(rows, key=lambda r: r["payload_GBps"])
            print(f"{op:<9} {size:<22} {r['variant']:<52} {r['payload_GBps']:>12.1f} {r['moved_GBps']:>11.1f} "
                  f"{r.get('vs_d2d', ''):>7}")
    wrong = [r for r in table.rows if not r["ok"]]
    if wrong:
        print(f"\n{len(wrong)} variant(s) gave WRONG results: " + "; ".join(f"{r['op']} {r['variant']}" for r in wrong))
    if cuda or (args.write_cpu and not args.dry_run):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"kernels_{slug}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path} ({result['wall_s']} s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
