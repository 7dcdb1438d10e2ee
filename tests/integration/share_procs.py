"""Both sides of a device share, for tests/integration/test_device_share.py (GPU only).

Owner (imported by the test): :func:`owner_snapshot` saves random KV blocks of a CUDA cache
through KVTransport (the product's save path) and holds the payload on the device.
Importer (this file run as a script, a process of its own as a pool worker would be)::

    python share_procs.py < {"desc": ..., "namespace": ..., "block_ids": [...]}
    -> one JSON line: {"copy_sha256", "cache_sha256", "seconds", "device"}
                      or {"error": "<exception type>", "message": ...}

It fills its own cache with a poison value, opens the share (copy + device CRC check) and
scatters the verified copy into ``block_ids`` with ``KVTransport.load_verified``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import torch

from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.file import FileStore
from thaw_agents_core.transport.device_share import open_share
from thaw_agents_core.transport.kv import KVTransport, detect_page_spec
from thaw_agents_core.transport.prefetch import HeldSnapshot
from thaw_kernels import kv_gather

LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 64, 16, 8, 128  # 256 KiB blocks, bf16
BLOCKS_PER_CHUNK = 4  # 1 MiB CRC chunks: several per snapshot
POISON = -7.0


def namespace(weights_version: str = "") -> Namespace:
    return Namespace(
        "share-test", weights_version, "bfloat16", "auto", "cuda", BLOCK_SIZE, LAYERS,
        (BLOCK_SIZE, KV_HEADS, HEAD_DIM), "test",
    )  # fmt: skip


def cache(seed: int | None) -> list[torch.Tensor]:
    """FlashAttention-layout bf16 layers: random (``seed``) or all POISON (None)."""
    shape = (2, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    if seed is None:
        return [
            torch.full(shape, POISON, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)
        ]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, device="cuda").to(torch.bfloat16)
        for _ in range(LAYERS)
    ]


def blocks_sha256(layers: list[torch.Tensor], block_ids: list[int]) -> str:
    """SHA-256 of the blocks' bytes in snapshot order (every layer, both halves)."""
    gathered = kv_gather(layers, block_ids, detect_page_spec(layers[0]))
    return hashlib.sha256(gathered.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def owner_snapshot(store_dir: str, block_ids: list[int], seed: int = 0):
    """(HeldSnapshot with the payload on the device, SHA-256 of the source blocks)."""
    layers = cache(seed)
    transport = KVTransport(layers, namespace(), FileStore(store_dir))
    transport.blocks_per_chunk = BLOCKS_PER_CHUNK
    tokens = [(7 * i) % 250 + 3 for i in range(len(block_ids) * BLOCK_SIZE)]
    ref, _ = transport.save(tokens, block_ids)
    view = transport.store.open(ref)
    payload = torch.frombuffer(bytearray(view.payload), dtype=torch.uint8).cuda()
    held = HeldSnapshot(view.header, payload, 0.0)
    view.close()
    return held, blocks_sha256(layers, block_ids)


def main() -> int:
    request = json.loads(sys.stdin.read())
    layers = cache(None)
    transport = KVTransport(layers, namespace(), FileStore(tempfile.mkdtemp()))
    try:
        held = open_share(request["desc"], "cuda", Namespace.from_json(request["namespace"]))
    except Exception as exc:  # noqa: BLE001 - the test asserts on the kind
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 0
    block_ids = request["block_ids"]
    transport.load_verified(held, 0, held.header.num_blocks, block_ids)
    copy_sha = hashlib.sha256(held.payload.cpu().numpy().tobytes()).hexdigest()
    print(
        json.dumps(
            {
                "copy_sha256": copy_sha,
                "cache_sha256": blocks_sha256(layers, block_ids),
                "seconds": held.seconds,
                "device": str(held.payload.device),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
