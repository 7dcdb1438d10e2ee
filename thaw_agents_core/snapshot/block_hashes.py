"""Chained block hashes: the key a snapshot is published and looked up under.

A prompt is cut into full blocks of ``block_size`` tokens (the partial tail block is
never hashed: only full blocks are cached). Block ``i`` gets

    h_root = sha256(b"thaw-kv/1\\0" + salt)
    h_i    = sha256(h_{i-1} + int32_le(tokens of block i))      # h_{-1} = h_root

so ``h_k`` commits to blocks ``0..k``: two prompts whose ``k``-th hashes are equal share their
first ``k + 1`` blocks. That lets a store index every block hash of every snapshot and answer
"longest shared prefix" with a handful of dict look-ups.

The hash covers tokens only, not the model: the model, dtype, layout... live in the snapshot's
namespace (``snapshot.format.Namespace``). ``salt`` separates otherwise equal token streams that
must not share KV (e.g. a per-tenant cache salt). sha256 is reproducible across processes, unlike
Python's ``hash()`` or seeded xxhash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

HASH_ALGO = "sha256-chain-v1"
"""Name of this scheme; recorded in every snapshot's namespace."""

_ROOT_TAG = b"thaw-kv/1\0"
_INT32_MAX = 2**31 - 1


def root_hash(salt: bytes = b"") -> bytes:
    """The chain's starting value ``h_{-1}`` for ``salt``."""
    return hashlib.sha256(_ROOT_TAG + bytes(salt)).digest()


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """``token_ids`` as int32 little-endian bytes; raises ValueError on ids outside [0, 2**31)."""
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > _INT32_MAX:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside [0, {_INT32_MAX}]")
    return arr.astype("<i4", copy=False).tobytes()


def block_hash_chain(
    token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes = b""
) -> list[bytes]:
    """One 32-byte digest per FULL block of ``token_ids`` (the partial tail is ignored).

    ~1 ms for 100k tokens: the ids are converted once with numpy, then each block's bytes are
    fed to sha256 from a memoryview (no per-token Python work).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    data = memoryview(token_bytes(token_ids))
    num_blocks = len(data) // (4 * block_size)
    step = 4 * block_size
    prev = root_hash(salt)
    out: list[bytes] = []
    for i in range(num_blocks):
        h = hashlib.sha256(prev)
        h.update(data[i * step : (i + 1) * step])
        prev = h.digest()
        out.append(prev)
    return out
