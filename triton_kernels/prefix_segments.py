"""Segments of a shared-prefix batch and their packed plan (for :mod:`.prefix_attention`).

A *segment* is a run of KV tokens (a block table and a token count, which may end mid-block)
that a set of branches attends to; a branch attends to the concatenation of its segments
(a level-0 prefix shared by all, a level-1 prefix shared by a group, its own tail: any list).
:func:`plan_segments` validates them and packs chunks, tiles and the per-branch merge lists
into device tensors in one host-to-device copy; build it once per batch, reuse it per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MIN_CHUNK_TOKENS = 256
"""A segment is split into chunks of at least this many tokens (fewer partials to merge)."""


@dataclass(frozen=True)
class Segment:
    """``num_tokens`` KV tokens, from the start of ``block_table``'s first block, that every
    branch in ``branches`` (indices into q's first dimension, no repeats) attends to."""

    block_table: torch.Tensor | Sequence[int]
    num_tokens: int
    branches: torch.Tensor | Sequence[int]


def host_ints(x: torch.Tensor | Sequence[int]) -> list[int]:
    """The integers of a tensor or sequence (block ids, branch indices) as a Python list."""
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """Segments packed into device tensors for one batch: build once with :func:`plan_segments`,
    pass to :func:`shared_prefix_attention` for every layer."""

    segments: tuple[Segment, ...]
    num_branches: int
    num_q_heads: int
    num_kv_heads: int
    block_size: int
    max_block_id: int
    block_tables: torch.Tensor
    """int32: every segment's block table (its blocks in use), one after the other."""
    seg_branches: torch.Tensor
    """int32: every segment's branches, one segment after the other."""
    launches: tuple[tuple[int, torch.Tensor], ...]
    """(BLOCK_M, int32 tiles [T, 8]) per kernel-1 launch; a tile row holds (offset of the
    segment's table in block_tables, first token, end token, first pair, offset of its
    branches in seg_branches, branches, first row, 0)."""
    num_pairs: int
    branch_ptr: torch.Tensor
    """int32 [B + 1]: branch b's pairs are branch_pairs[branch_ptr[b]:branch_ptr[b + 1]]."""
    branch_pairs: torch.Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_segments(
    segments: Sequence[Segment],
    num_branches: int,
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    device: torch.device | str = "cpu",
    chunk_tokens: int | None = None,
    block_m: int | None = None,
    num_sms: int | None = None,
) -> SegmentPlan:
    """Validate ``segments`` and pack them (one host-to-device copy).

    ``chunk_tokens`` fixes the chunk length (default: balanced over ``num_sms``, see the module
    docstring); ``block_m`` fixes the query rows of every tile (default 16 for segments of at
    most 16 rows, else 64).
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    device = torch.device(device)
    tables: list[int] = []
    segs: list[tuple[int, int, list[int]]] = []  # (table offset, tokens, branches)
    seen = [0] * num_branches
    max_block = 0
    for i, seg in enumerate(segments):
        table, branches, n = host_ints(seg.block_table), host_ints(seg.branches), seg.num_tokens
        if n == 0 or not branches:
            continue
        if n < 0 or n > len(table) * block_size:
            raise ValueError(f"segment {i}: {n} tokens do not fit {len(table)} blocks")
        if min(branches) < 0 or max(branches) >= num_branches or len(set(branches)) < len(branches):
            raise ValueError(
                f"segment {i}: branches {branches} not distinct in [0, {num_branches})"
            )
        table = table[: _cdiv(n, block_size)]
        if min(table) < 0:
            raise ValueError(f"segment {i}: negative block id")
        max_block = max(max_block, max(table))
        for b in branches:
            seen[b] += n
        segs.append((len(tables), n, branches))
        tables.extend(table)
    if not all(seen):
        raise ValueError(f"branches {[b for b, n in enumerate(seen) if not n]} attend to no token")
    if num_sms is None:
        on_gpu = device.type == "cuda"
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 8
    bms = [block_m or (16 if len(br) * group <= 16 else 64) for _, _, br in segs]
    mtiles = [_cdiv(len(br) * group, bm) for (_, _, br), bm in zip(segs, bms)]
    if chunk_tokens is None:
        work = sum(mt * n for mt, (_, n, _) in zip(mtiles, segs)) * num_kv_heads
        chunk_tokens = max(MIN_CHUNK_TOKENS, _cdiv(work, 2 * num_sms))
    # Tiles (chunk tokens, BLOCK_M, row); a chunk's pairs (one per branch) are consecutive.
    tiles, pair, branch_off, branch_pairs = [], 0, 0, [[] for _ in range(num_branches)]
    seg_branches: list[int] = []
    for (table_off, n, br), bm, mt in zip(segs, bms, mtiles):
        step = _cdiv(_cdiv(n, _cdiv(n, chunk_tokens)), 16) * 16
        for start in range(0, n, step):
            end = min(n, start + step)
            for j, b in enumerate(br):
                branch_pairs[b].append(pair + j)
            for m0 in range(0, mt * bm, bm):
                tiles.append(
                    (end - start, bm, [table_off, start, end, pair, branch_off, len(br), m0, 0])
                )
            pair += len(br)
        branch_off += len(br)
        seg_branches.extend(br)
    tiles.sort(key=lambda t: -t[0])  # longest first: they start first and finish last
    launches = [
        (bm, [v for t in tiles if t[1] == bm for v in t[2]])
        for bm in dict.fromkeys(t[1] for t in tiles)
    ]
    ptr = [0]
    for pairs in branch_pairs:
        ptr.append(ptr[-1] + len(pairs))
    flat = tables + seg_branches + ptr + [p for ps in branch_pairs for p in ps]
    for _, rows in launches:
        flat.extend(rows)
    sizes = [len(tables), len(seg_branches), num_branches + 1, pair]
    sizes += [len(rows) for _, rows in launches]
    parts = torch.tensor(flat, dtype=torch.int32).to(device).split(sizes)
    return SegmentPlan(
        segments=tuple(segments),
        num_branches=num_branches,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        max_block_id=max_block,
        block_tables=parts[0],
        seg_branches=parts[1],
        launches=tuple((bm, t.view(-1, 8)) for (bm, _), t in zip(launches, parts[4:])),
        num_pairs=pair,
        branch_ptr=parts[2],
        branch_pairs=parts[3],
    )


# ---------------------------------------------------------------------------------------------
# Torch reference: each branch's tokens gathered, plain softmax attention in fp32.
