"""A prefix's KV from one process's GPU memory into another's: device share vs the host path.

Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks): 8192 tokens =
512 blocks = 1 GiB. The owner (this process) saves them through KVTransport into a registered
shared-memory store (the product's save path) and holds the payload on its device. The
importer (this file with ``--child``, a process of its own, as a pool worker is) measures, per
repeat, on the same bytes:

- share: ``open_share`` (CUDA IPC open, one device copy, every chunk's CRC32C on the device)
  then ``KVTransport.load_verified`` into its cache;
- host: ``KVTransport.load`` from the owner's store (pinned H2D, CRC, scatter: the path a
  worker on another host, or without a share, takes);
- baselines: a device-to-device copy of the same bytes inside the importer and a pinned
  host-to-device copy (the physical limits of the two paths on this machine).

Both processes on one GPU exercise the CUDA IPC path; the copy is then HBM to HBM. Across GPUs
it is a peer copy over the link (benchmarks/multigpu.py once a multi-GPU machine is lent).

    python benchmarks/device_share.py [--tokens 8192] [--repeat 3] [--out PATH]
    -> results/device_share_<gpu-slug>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, device_slug, machine_info, percentiles, write_results  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
CACHE_BLOCKS = 1100  # the importer's cache: room for the 512 blocks at other ids
STORE = f"devshare-{os.getpid()}"


def namespace():
    from thaw_agents_core.snapshot.namespace import Namespace

    return Namespace("bench", "", "bfloat16", "bfloat16", "cuda", BLOCK, LAYERS,
                     (BLOCK, KV_HEADS, HEAD_DIM), "none")  # fmt: skip


def cache(num_blocks: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    return [
        torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, device="cuda",
                      generator=generator).view(torch.bfloat16)
        for _ in range(LAYERS)
    ]  # fmt: skip


def now() -> float:
    """perf_counter once the device is idle."""
    torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------------- importer


def child(request: dict) -> dict:
    from thaw_agents_core.store.base import SnapshotRef
    from thaw_agents_core.store.shm import ShmStore
    from thaw_agents_core.transport.device_share import open_share
    from thaw_agents_core.transport.kv import KVTransport
    from thaw_agents_core.transport.stream_scheduler import StreamScheduler

    n, repeat = request["blocks"], request["repeat"]
    layers = cache(CACHE_BLOCKS, seed=1)
    store = ShmStore(request["store"], create=False)
    copier = StreamScheduler(torch.device("cuda"))
    copier.register_host(store.arena_view())
    transport = KVTransport(layers, namespace(), store, copier)
    ref = SnapshotRef(**request["ref"])
    targets = list(range(CACHE_BLOCKS - n, CACHE_BLOCKS))
    share_s, scatter_s, host_s, d2d_s, h2d_s, held_s = [], [], [], [], [], []
    nbytes = None
    pinned = None
    for rep in range(repeat + 1):  # rep 0 warms up (IPC open, Triton compiles, allocator)
        began = now()
        held = open_share(request["desc"], "cuda", namespace())
        opened = now()
        transport.load_verified(held, 0, n, targets)
        scattered = now()
        transport.load(ref, 0, n, targets)
        loaded = now()
        nbytes = held.payload.numel()
        twin = torch.empty_like(held.payload)
        copy_began = now()
        twin.copy_(held.payload)
        copied = now()
        if pinned is None:
            pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        h2d_began = now()
        twin.copy_(pinned, non_blocking=True)
        h2d_done = now()
        del held, twin
        if rep:
            share_s.append(opened - began)
            scatter_s.append(scattered - opened)
            held_s.append(scattered - began)
            host_s.append(loaded - scattered)
            d2d_s.append(copied - copy_began)
            h2d_s.append(h2d_done - h2d_began)
    copier.close()
    store.close()
    return {
        "bytes": nbytes,
        "open_share_s": percentiles(share_s, digits=None),
        "load_verified_s": percentiles(scatter_s, digits=None),
        "share_total_s": percentiles(held_s, digits=None),
        "host_load_s": percentiles(host_s, digits=None),
        "d2d_copy_s": percentiles(d2d_s, digits=None),
        "h2d_pinned_s": percentiles(h2d_s, digits=None),
    }


# ---------------------------------------------------------------------- owner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(sys.stdin.read()))))
        return
    if not torch.cuda.is_available():
        raise SystemExit("device shares move between CUDA devices: run this on a GPU")
    from thaw_agents_core.store.shm import ShmStore
    from thaw_agents_core.transport.device_share import share_held
    from thaw_agents_core.transport.kv import KVTransport
    from thaw_agents_core.transport.prefetch import HeldSnapshot
    from thaw_agents_core.transport.stream_scheduler import StreamScheduler

    n = args.tokens // BLOCK
    block_bytes = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2
    store = ShmStore(STORE, n * block_bytes + (64 << 20), create=True)
    copier = StreamScheduler(torch.device("cuda"))
    copier.register_host(store.arena_view())
    try:
        layers = cache(n + 8, seed=0)
        transport = KVTransport(layers, namespace(), store, copier)
        tokens = [1000 + (7919 * i) % 100000 for i in range(n * BLOCK)]
        ref, _ = transport.save(tokens, list(range(8, n + 8)))
        view = store.open(ref)
        payload = torch.empty(view.header.payload_bytes, dtype=torch.uint8, device="cuda")
        payload.copy_(torch.frombuffer(view.payload, dtype=torch.uint8))
        held = HeldSnapshot(view.header, payload, 0.0)
        request = {
            "desc": share_held(held),
            "store": STORE,
            "ref": {"namespace_key": ref.namespace_key, "snapshot_id": ref.snapshot_id},
            "blocks": n,
            "repeat": args.repeat,
        }  # fmt: skip
        done = subprocess.run(
            [sys.executable, __file__, "--child"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=500,
        )
        if done.returncode:
            raise SystemExit(f"the importer failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        view.close()
    finally:
        copier.close()
        store.close()
    nbytes = result["bytes"]
    share, host = result["share_total_s"]["p50"], result["host_load_s"]["p50"]
    d2d, h2d = result["d2d_copy_s"]["p50"], result["h2d_pinned_s"]["p50"]
    payload_out = {
        "machine": machine_info(),
        "tokens": args.tokens,
        "blocks": n,
        "bytes": nbytes,
        **result,
        "share_GBps_p50": round(nbytes / share / 1e9, 1),
        "host_GBps_p50": round(nbytes / host / 1e9, 1),
        "share_vs_host": round(share / host, 3),
        "estimate": {
            "share_s": round(d2d, 6),
            "host_s": round(h2d, 6),
            "note": "one GPU: the share's copy is HBM to HBM (the importer's own D2D copy of "
            "the same bytes); across GPUs it is the link's rate. Host: the pinned H2D copy.",
        },
        "share_vs_estimate": round(share / d2d, 2),
    }
    out = args.out or RESULTS / f"device_share_{device_slug()}.json"
    write_results(out, payload_out)
    print(json.dumps({k: v for k, v in payload_out.items() if k != "machine"}, indent=1))
    print(f"wrote {out}; median share {share * 1e3:.2f} ms vs host {host * 1e3:.2f} ms "
          f"(copy D2D {d2d * 1e3:.2f} ms, pinned H2D {h2d * 1e3:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
