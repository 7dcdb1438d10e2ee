"""Sample snapshots for the store tests of both tiers.

Used by tests/unit/test_store.py, tests/integration/test_store_processes.py and the child
processes that test starts (they put this folder on ``sys.path`` themselves; pytest does it for
the tests, through tests/conftest.py).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from thaw_agents_core.snapshot.block_hashes import block_hash_chain
from thaw_agents_core.snapshot.io import build_snapshot
from thaw_agents_core.snapshot.namespace import Namespace

NS = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
KEY = NS.key()
OTHER_KEY = Namespace(**{**NS.to_json(), "block_size": 8}).key()
BLOCK_BYTES = 64
CAPACITY = 64 * 4096  # 256 KiB: a 1-8 block snapshot takes 2 pages (4096 header + payload)

BASE = list(range(1000, 1040))  # 10 blocks


def snapshot(tokens: list[int], seed: int = 0, **kw) -> bytearray:
    """A snapshot whose payload bytes are a deterministic function of (seed, tokens)."""
    rng = np.random.default_rng([seed, *tokens[:4], len(tokens)])
    payload = rng.integers(0, 256, len(tokens) // 4 * BLOCK_BYTES, dtype=np.uint8)
    return build_snapshot(
        NS, tokens, BLOCK_BYTES, payload, blocks_per_chunk=2, created_unix=1700000000, **kw
    )


def chain(tokens: list[int]) -> list[bytes]:
    return block_hash_chain(tokens, 4)


def thaw_shm_entries() -> set[str]:
    """/dev/shm entries of the stores this process's tests name (``shm_name()``): other
    processes' arenas (an integration run beside this one) come and go on their own."""
    mine = f"test-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith((f"thaw-{mine}", f".thaw-{mine}"))}


@pytest.fixture(autouse=True)
def no_shm_leaks():
    """Autouse in every module that imports it: no test may leave /dev/shm entries behind."""
    before = thaw_shm_entries()
    yield
    assert thaw_shm_entries() == before, "a test leaked /dev/shm entries"


def shm_name() -> str:
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
