"""A snapshot's verified device copy handed to another process GPU to GPU (CUDA IPC), on a GPU.

Two processes on one GPU take the same CUDA IPC path as a parent and a worker on two GPUs (the
copy is then a peer copy). The owner saves random KV blocks through KVTransport and shares the
payload's device memory; the importer (share_procs.py, its own process) copies it, checks every
chunk's CRC32C on the device and scatters it into a poisoned cache. Asserted: the importer's
cache holds exactly the owner's blocks; a byte flipped in the owner's memory after the share
was made (first, middle, last chunk) is refused with the chunk named and nothing loaded; a
snapshot of other weights is refused before any copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HELPER = Path(__file__).with_name("share_procs.py")
BLOCK_IDS = [5, 9, 2, 40, 41, 42, 17, 3, 60, 33, 12, 7]  # 12 blocks: 3 CRC chunks


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    import share_procs

    held, blocks_sha = share_procs.owner_snapshot(str(tmp_path_factory.mktemp("store")), BLOCK_IDS)
    return held, blocks_sha


def _import(desc: dict, namespace, block_ids: list[int]) -> dict:
    request = {"desc": desc, "namespace": namespace.to_json(), "block_ids": block_ids}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPER.parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(HELPER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_another_process_loads_exactly_the_owners_blocks(owner):
    import hashlib

    import share_procs

    from thaw_agents_core.transport.device_share import share_held

    held, blocks_sha = owner
    targets = [63 - b for b in BLOCK_IDS]  # other block ids in the importer's cache
    reply = _import(share_held(held), share_procs.namespace(), targets)
    assert "error" not in reply, reply
    assert reply["copy_sha256"] == hashlib.sha256(held.payload.cpu().numpy().tobytes()).hexdigest()
    assert reply["cache_sha256"] == blocks_sha  # every block, every layer, in place
    assert reply["device"].startswith("cuda")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_byte_flipped_after_sharing_is_refused(owner, where):
    import share_procs

    from thaw_agents_core.transport.device_share import share_held

    held, _ = owner
    chunk = held.header.blocks_per_chunk * held.header.block_bytes
    at = {"first": 3, "middle": held.payload.numel() // 2, "last": held.payload.numel() - 1}[where]
    desc = share_held(held)  # the handle first, the corruption after: the importer must notice
    held.payload[at] ^= 0x40
    torch.cuda.synchronize()  # the flip is in memory before the importer starts
    try:
        reply = _import(desc, share_procs.namespace(), BLOCK_IDS)
    finally:
        held.payload[at] ^= 0x40
    assert reply["error"] == "SnapshotChecksumError", reply
    assert f"chunk(s) [{at // chunk}]" in reply["message"]


def test_a_snapshot_of_other_weights_is_refused_before_any_copy(owner):
    import share_procs

    from thaw_agents_core.transport.device_share import share_held

    held, _ = owner
    reply = _import(share_held(held), share_procs.namespace("next-weights"), BLOCK_IDS)
    assert reply["error"] == "SnapshotMismatchError" and "weights_version" in reply["message"]
