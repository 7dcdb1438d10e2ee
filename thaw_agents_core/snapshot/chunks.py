"""Chunks of a ``.thawkv`` payload: which chunks cover a prefix of blocks, and their CRC32Cs.

A chunk is ``blocks_per_chunk`` whole blocks (the last may be short), so loading the first k
blocks verifies exactly the chunks that cover them (see :mod:`.format` for the layout).
"""

from __future__ import annotations

from typing import Any, Sequence

import google_crc32c
import numpy as np

from thaw_agents_core.snapshot.errors import SnapshotChecksumError
from thaw_agents_core.snapshot.format import DEFAULT_CHUNK_BYTES, SnapshotHeader, SnapshotView
from thaw_agents_core.snapshot.framing import as_bytes_view


def default_blocks_per_chunk(block_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Blocks per CRC chunk so a chunk holds about ``chunk_bytes`` (at least 1 block)."""
    return max(1, chunk_bytes // max(1, block_bytes))


def chunk_range(header: SnapshotHeader, num_blocks: int | None = None) -> range:
    """Indices of the chunks covering the first ``num_blocks`` blocks (all by default)."""
    k = header.num_blocks if num_blocks is None else num_blocks
    if not 0 <= k <= header.num_blocks:
        raise ValueError(f"num_blocks {k} outside [0, {header.num_blocks}]")
    return range(-(-k // header.blocks_per_chunk))


def chunk_byte_range(header: SnapshotHeader, chunk_index: int) -> tuple[int, int]:
    """Payload-relative [start, end) of one chunk."""
    step = header.blocks_per_chunk * header.block_bytes
    return chunk_index * step, min((chunk_index + 1) * step, header.payload_bytes)


def covering_byte_range(header: SnapshotHeader, num_blocks: int) -> tuple[int, int]:
    """Payload-relative [0, end) of the whole chunks covering the first ``num_blocks`` blocks:
    what a partial load must copy to be able to verify what it uses."""
    chunks = chunk_range(header, num_blocks)
    return 0, (chunk_byte_range(header, chunks[-1])[1] if chunks else 0)


def crc32c(data: Any) -> int:
    """CRC32C of a bytes-like object without copying it (numpy view over the buffer)."""
    return google_crc32c.value(np.frombuffer(as_bytes_view(data), dtype=np.uint8))


def compute_chunk_crcs(payload: Any, block_bytes: int, blocks_per_chunk: int) -> list[int]:
    """CRC32C of each ``blocks_per_chunk``-block chunk of ``payload``, on the CPU."""
    mv = as_bytes_view(payload)
    step = block_bytes * blocks_per_chunk
    return [crc32c(mv[i : i + step]) for i in range(0, len(mv), step)]


def check_chunk_crcs(header: SnapshotHeader, crcs: Sequence[int], first_chunk: int = 0) -> None:
    """The one chunk check: ``crcs`` (computed over chunks ``first_chunk, first_chunk + 1, ...``)
    must equal the header's; raises :class:`SnapshotChecksumError` naming every bad chunk."""
    want = header.chunk_crc32c[first_chunk : first_chunk + len(crcs)]
    bad = [
        first_chunk + i for i, (got, expected) in enumerate(zip(crcs, want)) if int(got) != expected
    ]
    bad += range(first_chunk + len(want), first_chunk + len(crcs))  # past the header's chunks
    if bad:
        raise SnapshotChecksumError(bad, header.num_chunks)


def verify_chunks(view: SnapshotView, num_blocks: int | None = None) -> list[int]:
    """CRC32C the chunks covering the first ``num_blocks`` blocks; return the bad chunk indices."""
    h = view.header
    bad = []
    for i in chunk_range(h, num_blocks):
        start, end = chunk_byte_range(h, i)
        try:
            check_chunk_crcs(h, [crc32c(view.payload[start:end])], i)
        except SnapshotChecksumError:
            bad.append(i)
    return bad


def check_chunks(view: SnapshotView, num_blocks: int | None = None) -> None:
    """:func:`verify_chunks`, raising :class:`SnapshotChecksumError` on any bad chunk."""
    bad = verify_chunks(view, num_blocks)
    if bad:
        raise SnapshotChecksumError(bad, view.header.num_chunks)
