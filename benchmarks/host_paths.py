"""The host side of moving weights, measured piece by piece (no vLLM): what bounds freeze,
file restore and the state-dict update, so each path is built on the fastest way this machine
has.

- write: pinned host bytes -> a new file (the freeze's last leg), by mmap + threads and by
  pwrite (1 or several threads), on the work folder's file system and on /dev/shm; the fsync
  after each is timed on its own (the page cache holds the file either way).
- read: a page-cached file -> pinned host memory, by mmap + threads and by preadv (1..16
  threads); then the product's restore leg (StreamScheduler.to_device) from an mmap into
  device memory with every chunk's CRC32C.
- thaw: the product's own legs on Llama-3.1-8B engine-layout shapes (227 bf16 tensors, 16 GB,
  no engine): write_weights from device tensors, restore_into from the page-cached file (a
  fresh mmap each time) and from a registered WeightsBuffer, each beside the raw pinned copy.
- ipc: a state dict of Llama-3.1-8B engine-layout shapes (227 bf16 tensors, 16 GB) exported by
  another process: opening its CUDA IPC handles, copying into this process's tensors, and a
  device-to-device copy of the same bytes.

    python benchmarks/host_paths.py [--gib 4] [--workdir /tmp/thaw-paths]
                                       [--sections write_read,thaw,ipc]
    -> results/host_paths_<gpu-slug>.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, device_slug, machine_info, write_results  # noqa: E402

CHUNK = 64 << 20


def _fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip()


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError("short read")
        view, offset = view[got:], offset + got


def write_file(path: Path, src: torch.Tensor, how: str, threads: int, pool: Any) -> float:
    """Seconds to put ``src`` into a new file at ``path`` (page cache; no fsync)."""
    n = src.numel()
    view = memoryview(src.numpy())
    began = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if how.startswith("fallocate"):
            os.posix_fallocate(fd, 0, n)
        else:
            os.ftruncate(fd, n)
        if how.endswith("mmap"):
            with mmap.mmap(fd, n) as mm:
                dst = torch.frombuffer(mm, dtype=torch.uint8)
                list(pool.map(lambda r: dst[r[0] : r[1]].copy_(src[r[0] : r[1]]),
                              _ranges(n, threads)))  # fmt: skip
                del dst
        else:  # pwrite: each thread writes CHUNK-sized pieces of its range

            def part(r: tuple[int, int]) -> None:
                for lo in range(r[0], r[1], CHUNK):
                    _pwrite_all(fd, view[lo : min(lo + CHUNK, r[1])], lo)

            list(pool.map(part, _ranges(n, threads)))
        seconds = time.perf_counter() - began
    finally:
        os.close(fd)
    return seconds


def fsync_seconds(path: Path) -> float:
    began = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - began


def read_file(path: Path, dst: torch.Tensor, how: str, threads: int, pool: Any) -> float:
    """Seconds to read the page-cached file into pinned ``dst``, CHUNK by CHUNK (as staging)."""
    n = dst.numel()
    view = memoryview(dst.numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        began = time.perf_counter()
        if how == "mmap":
            with mmap.mmap(fd, n, access=mmap.ACCESS_READ) as mm:
                from thaw_agents_core.transport.stream_scheduler import as_uint8_tensor

                src = as_uint8_tensor(mm)
                for lo in range(0, n, CHUNK):
                    hi = min(lo + CHUNK, n)
                    list(pool.map(lambda r: dst[r[0] : r[1]].copy_(src[r[0] : r[1]]),
                                  _ranges_in(lo, hi, threads)))  # fmt: skip
                del src
        else:
            for lo in range(0, n, CHUNK):
                hi = min(lo + CHUNK, n)
                list(pool.map(lambda r: _pread_all(fd, view[r[0] : r[1]], r[0]),
                              _ranges_in(lo, hi, threads)))  # fmt: skip
        return time.perf_counter() - began
    finally:
        os.close(fd)


def _ranges_in(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    return [(lo + a, lo + b) for a, b in _ranges(hi - lo, parts)]


def section_write_read(gib: float, work: Path) -> dict[str, Any]:
    n = int(gib * (1 << 30)) // CHUNK * CHUNK
    src = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    src.view(torch.int64).random_()
    dst = torch.empty_like(src, pin_memory=torch.cuda.is_available())
    pool = ThreadPoolExecutor(16)
    out: dict[str, Any] = {"bytes": n, "write": [], "read": []}
    folders = [work, Path("/dev/shm")]
    out["fs"] = {str(f): _fs_type(f) for f in folders}
    for folder in folders:
        path = folder / f"thaw-paths-{os.getpid()}.bin"
        for how, threads in [("truncate+mmap", 8), ("truncate+mmap", 16), ("fallocate+mmap", 16),
                             ("truncate+pwrite", 1), ("truncate+pwrite", 8),
                             ("fallocate+pwrite", 8)]:  # fmt: skip
            path.unlink(missing_ok=True)
            seconds = write_file(path, src, how, threads, pool)
            sync = fsync_seconds(path) if folder == work else 0.0
            row = {"folder": str(folder), "how": how, "threads": threads,
                   "seconds": round(seconds, 4), "gb_per_s": round(n / seconds / 1e9, 2),
                   "fsync_s": round(sync, 3)}  # fmt: skip
            out["write"].append(row)
            print("[paths] write", row, flush=True)
        for how, threads in [("mmap", 8), ("mmap", 16), ("pread", 1), ("pread", 4),
                             ("pread", 8), ("pread", 16)]:  # fmt: skip
            times = [read_file(path, dst, how, threads, pool) for _ in range(2)]
            seconds = min(times)
            row = {"folder": str(folder), "how": how, "threads": threads,
                   "seconds": round(seconds, 4), "gb_per_s": round(n / seconds / 1e9, 2)}  # fmt: skip
            out["read"].append(row)
            print("[paths] read", row, flush=True)
        if torch.cuda.is_available() and folder == work:
            out["restore_leg"] = restore_leg(path, n)
        path.unlink(missing_ok=True)
    pool.shutdown()
    return out


def restore_leg(path: Path, n: int) -> dict[str, Any]:
    """The product's host->device leg (staging, fill threads, CRC on the device) from an mmap
    of the page-cached file."""
    from thaw_agents_core.transport import stream_scheduler as ss

    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out: dict[str, Any] = {}
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, n, access=mmap.ACCESS_READ)
    try:
        for label, source in [("mmap", memoryview(mm))]:
            sched = ss.StreamScheduler(torch.device("cuda"))
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                began = time.perf_counter()
                sched.to_device(source, dev, 1 << 20).sum().item()
                times.append(time.perf_counter() - began)
            sched.close()
            out[label] = {"seconds": round(min(times), 4),
                          "gb_per_s": round(n / min(times) / 1e9, 2)}  # fmt: skip
            print("[paths] restore leg", label, out[label], flush=True)
    finally:
        mm.close()
        os.close(fd)
    del dev
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------- CUDA IPC state dict

H, FF, V, L, KV = 4096, 14336, 128256, 32, 1024


def engine_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("embed", (V, H))]
    for i in range(L):
        shapes += [(f"l{i}.qkv", (H + 2 * KV, H)), (f"l{i}.o", (H, H)),
                   (f"l{i}.gate_up", (2 * FF, H)), (f"l{i}.down", (H, FF)),
                   (f"l{i}.in_norm", (H,)), (f"l{i}.post_norm", (H,))]  # fmt: skip
    return shapes + [("norm", (H,)), ("lm_head", (V, H))]


def section_thaw(work: Path) -> dict[str, Any]:
    """The product's freeze and restore legs (no engine) on 8B engine-layout shapes."""
    from thaw_agents_core.transport.stream_scheduler import StreamScheduler
    from thaw_agents_core.weights.buffer import WeightsBuffer
    from thaw_agents_core.weights.format import WeightsNamespace
    from thaw_agents_core.weights.io import open_weights, write_weights
    from thaw_agents_core.weights.restore import restore_into

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the code
    gen = torch.Generator(device=device).manual_seed(0)
    named = [(n, torch.randint(-(2**15), 2**15, s, dtype=torch.int16, device=device,
                               generator=gen).view(torch.bfloat16))
             for n, s in engine_shapes()]  # fmt: skip
    nbytes = sum(t.numel() * 2 for _, t in named)
    ns = WeightsNamespace("bench", "LlamaForCausalLM", "bfloat16", "engine", 0, 1, "v0")
    copier = StreamScheduler(torch.device(device))
    path = work / "paths.thaw"
    out: dict[str, Any] = {"bytes": nbytes, "tensors": len(named)}

    def rate(seconds: float) -> dict[str, float]:
        return {"seconds": round(seconds, 4), "gb_per_s": round(nbytes / seconds / 1e9, 2)}

    path.unlink(missing_ok=True)
    out["freeze"] = rate(write_weights(path, named, ns, copier=copier).seconds)
    print("[paths] thaw freeze", out["freeze"], flush=True)
    began = time.perf_counter()
    write_weights(path, named, ns, copier=copier, durable=True)
    out["freeze_durable"] = rate(time.perf_counter() - began)
    print("[paths] thaw freeze durable", out["freeze_durable"], flush=True)
    targets = {n: torch.empty_like(t) for n, t in named}
    del named
    times = []
    for _ in range(3):
        began = time.perf_counter()
        with open_weights(path) as wf:
            restore_into(wf, targets, copier)
        times.append(time.perf_counter() - began)
    out["file_restore"] = {**rate(min(times)), "times": [round(t, 4) for t in times]}
    print("[paths] thaw file restore", out["file_restore"], flush=True)
    with open_weights(path) as wf:
        host = {e.name: wf.tensor_of(e) for e in wf.header.tensors}
        buf = WeightsBuffer.for_tensors(host, slack=0.01)
        buf.write(host, "buffered", layout="engine")
        del host
    try:
        out["register_s"] = round(copier.register_host(buf.buffer), 3)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            with buf.open() as view:
                restore_into(view, targets, copier)
            times.append(time.perf_counter() - began)
        out["buffer_restore"] = {**rate(min(times)), "times": [round(t, 4) for t in times]}
        print("[paths] thaw buffer restore", out["buffer_restore"], flush=True)
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        with buf.open() as view:
            src = torch.frombuffer(view.payload, dtype=torch.uint8)[:nbytes]
            times = []
            for _ in range(3):
                _sync()
                began = time.perf_counter()
                flat.copy_(src, non_blocking=True)
                _sync()
                times.append(time.perf_counter() - began)
            del src
        out["raw_pinned"] = rate(min(times))
        print("[paths] thaw raw pinned", out["raw_pinned"], flush=True)
        del flat
    finally:
        copier.close()
        buf.close()
    path.unlink(missing_ok=True)
    del targets
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ipc_child() -> None:
    """Own a state dict on the GPU, print its IPC entries as one JSON line, wait for EOF."""
    from thaw_agents_core.weights.sources import describe_cuda_ipc

    tensors = {n: torch.ones(s, dtype=torch.bfloat16, device="cuda") for n, s in engine_shapes()}
    torch.cuda.synchronize()
    for _ in range(2):  # twice: the second export of the same tensors (a trainer's next step)
        began = time.perf_counter()
        print(json.dumps(describe_cuda_ipc(tensors)), flush=True)
        print(f"[paths] ipc export {time.perf_counter() - began:.5f} s", file=sys.stderr)
    sys.stdin.readline()
    for _ in range(2):
        print(json.dumps(describe_cuda_ipc(tensors)), flush=True)
    sys.stdin.read()


def section_ipc() -> dict[str, Any]:
    from thaw_agents_core.transport.cuda_ipc import open_tensor
    from thaw_agents_core.weights.restore import copy_tensors
    from thaw_agents_core.weights.sources import parse_cuda_ipc

    child = subprocess.Popen([sys.executable, __file__, "--ipc-child"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        exports = [json.loads(child.stdout.readline()) for _ in range(2)]
        targets = {n: torch.empty(s, dtype=torch.bfloat16, device="cuda")
                   for n, s in engine_shapes()}  # fmt: skip
        out: dict[str, Any] = {"tensors": len(targets),
                               "bytes": sum(t.numel() * 2 for t in targets.values())}  # fmt: skip
        kept = []
        for k, entries in enumerate(exports):
            began = time.perf_counter()
            parsed = list(parse_cuda_ipc(entries).items())
            parse_s = time.perf_counter() - began
            opened = {n: open_tensor(p) for n, p in parsed}
            torch.cuda.synchronize()
            open_s = time.perf_counter() - began - parse_s
            began = time.perf_counter()
            for n, t in opened.items():
                targets[n].copy_(t, non_blocking=True)
            torch.cuda.synchronize()
            copy_s = time.perf_counter() - began
            out[f"export_{k}"] = {"parse_s": round(parse_s, 5), "open_s": round(open_s, 5),
                                  "copy_s": round(copy_s, 5)}  # fmt: skip
            print("[paths] ipc", k, out[f"export_{k}"], flush=True)
            kept.append(opened)  # export 1 opened while export 0's tensors are alive
        del kept
        child.stdin.write("again\n")  # fresh exports, none of them opened here yet
        child.stdin.flush()
        held: list[torch.Tensor] = []  # as the engine worker: the last swap's tensors held open
        for k in range(2):
            desc = json.loads(child.stdout.readline())
            began = time.perf_counter()
            now: list[torch.Tensor] = []
            stats = copy_tensors(parse_cuda_ipc(desc), targets, keep=now)
            held = now
            out[f"product_{k}"] = {"seconds": round(time.perf_counter() - began, 5),
                                   "copy_tensors_s": round(stats.seconds, 5),
                                   "exact": all(bool(t.eq(1).all()) for t in targets.values())}  # fmt: skip
            for t in targets.values():
                t.zero_()
            print("[paths] ipc product", k, out[f"product_{k}"], flush=True)
        flat = [t.view(-1) for t in targets.values()]
        copies = [torch.empty_like(t) for t in flat]
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            began = time.perf_counter()
            for c, t in zip(copies, flat):
                c.copy_(t, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        out["d2d_s"] = round(min(times), 5)
        began = time.perf_counter()
        for _ in range(100):
            torch.empty(1, device="cuda").fill_(1)
        torch.cuda.synchronize()
        out["launch_us"] = round((time.perf_counter() - began) / 100 * 1e6, 2)
        print("[paths] ipc d2d", out["d2d_s"], flush=True)
        del held
        return out
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/thaw-paths"))
    parser.add_argument("--sections", default="write_read,thaw,ipc")
    parser.add_argument("--ipc-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ipc_child:
        ipc_child()
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"benchmark": "host_paths", "machine": machine_info(),
                               "kernel": os.uname().release}  # fmt: skip
    sections = args.sections.split(",")
    if "write_read" in sections:
        results["write_read"] = section_write_read(args.gib, args.workdir)
    if "thaw" in sections:
        results["thaw"] = section_thaw(args.workdir)
    if torch.cuda.is_available() and "ipc" in sections:
        results["ipc"] = section_ipc()
    suffix = "" if "write_read" in sections else "_" + "_".join(sections)
    path = RESULTS / f"host_paths_{device_slug()}{suffix}.json"
    write_results(path, results)
    print(f"[paths] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
