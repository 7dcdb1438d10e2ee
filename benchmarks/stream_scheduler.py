"""StreamScheduler vs a raw pinned copy: 1 GiB host <-> device, CRC32C included, one run.

Baseline: ``dst.copy_(src, non_blocking=True)`` between a device tensor and a pinned
(cudaHostAlloc) host tensor, timed with a synchronize. Candidates, each with chunk CRC32Cs:
- registered: host memory pinned once with cudaHostRegister (the shared-memory arena's case),
  chunked copies on a copy stream, CRCs on a second stream overlapping the next chunk;
- staged: pageable host memory through two pinned staging buffers (a file's mmap case).
Goal (issue 4): >= 90% of the raw pinned copy.

    python benchmarks/stream_scheduler.py  # -> results/stream_scheduler_<gpu-slug>.json
                                           #    (e.g. stream_scheduler_nvidia-h200.json)
"""

from __future__ import annotations

import mmap
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, device_slug, machine_info, percentiles, write_results  # noqa: E402

SIZE = 1 << 30
CRC_CHUNK = 4 << 20
REPS = 10


def timed(fn, reps: int = REPS) -> list[float]:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - began)
    return out


def main() -> int:
    from thaw_agents_core.transport.stream_scheduler import StreamScheduler

    if not torch.cuda.is_available():
        print("stream_scheduler: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dev = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, device=device)
    pinned = torch.empty(SIZE, dtype=torch.uint8, pin_memory=True)
    arena = mmap.mmap(-1, SIZE)  # anonymous shared mapping, like the shm arena
    pageable = bytearray(SIZE)
    scheduler = StreamScheduler(device)
    register_s = scheduler.register_host(arena)
    arena_t = torch.frombuffer(arena, dtype=torch.uint8)

    rows: dict[str, dict] = {}

    def add(name: str, seconds: list[float]) -> None:
        rows[name] = {
            "seconds": percentiles(seconds, digits=None),
            "GBps_p50": SIZE / statistics.median(seconds) / 1e9,
        }

    add("raw_pinned_h2d", timed(lambda: dev.copy_(pinned, non_blocking=True)))
    add("raw_pinned_d2h", timed(lambda: pinned.copy_(dev, non_blocking=True)))
    add("registered_h2d_crc", timed(lambda: scheduler.to_device(arena, dev, CRC_CHUNK)))
    add("registered_d2h_crc", timed(lambda: scheduler.to_host(dev, arena, CRC_CHUNK)))
    add("staged_h2d_crc", timed(lambda: scheduler.to_device(pageable, dev, CRC_CHUNK), reps=5))
    add("staged_d2h_crc", timed(lambda: scheduler.to_host(dev, pageable, CRC_CHUNK), reps=5))

    # Correctness: what went down comes back, and the CRCs agree with the CPU library's.
    crcs = scheduler.to_host(dev, arena, CRC_CHUNK)
    from thaw_kernels import chunk_crc32c

    assert crcs == chunk_crc32c(arena_t, CRC_CHUNK).tolist(), "device and CPU CRCs differ"
    back = torch.empty_like(dev)
    scheduler.to_device(arena, back, CRC_CHUNK)
    assert torch.equal(back, dev), "round trip changed the bytes"

    for direction in ("h2d", "d2h"):
        raw = rows[f"raw_pinned_{direction}"]["GBps_p50"]
        for kind in ("registered", "staged"):
            row = rows[f"{kind}_{direction}_crc"]
            row["ratio_vs_raw_pinned"] = row["GBps_p50"] / raw
    result = {
        "machine": machine_info(),
        "bytes": SIZE,
        "crc_chunk_bytes": CRC_CHUNK,
        "copy_chunk_bytes": scheduler.copy_chunk_bytes,
        "register_seconds": register_s,
        "goal_ratio_min": 0.9,
        "rows": rows,
    }
    path = write_results(RESULTS / f"stream_scheduler_{device_slug()}.json", result)
    for name, row in rows.items():
        ratio = row.get("ratio_vs_raw_pinned")
        print(f"{name:22} {row['GBps_p50']:7.1f} GB/s" + (f"  {ratio:5.2f}x raw" if ratio else ""))
    print(f"wrote {path}")
    scheduler.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
