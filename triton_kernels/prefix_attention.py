"""Shared-prefix ("cascade", Hydragen-style) decode attention over a paged KV cache.

In a fan-out, B decode queries (one new token per branch) share long runs of KV blocks. Plain
paged attention reads a shared prefix once per branch; here each shared run is read once for
all the branches (and all the GQA query heads) that attend to it, as a matrix-matrix product.

The KV tokens are described as **segments**: a block table, a token count (it may end mid-block)
and the set of branches that attend to it. A branch attends to the concatenation of all the
segments it belongs to, e.g. a level-0 prefix shared by all, a level-1 prefix shared by a group
of branches (a fork of a fork) and its own tail. Levels are not special: any list of segments.
The cache is one layer as vLLM's flash-attention backend holds it: ``key_cache`` and
``value_cache`` each ``[num_blocks, block_size, num_kv_heads, head_dim]``. ::

    plan (host, once per batch): segments -> chunks of <= L tokens (L balances the work over
    the SMs; a long prefix with few branches splits, a long one with many does not) -> tiles
    (chunk, BLOCK_M rows); rows = (branch of the segment, query head of the group), so a tile
    is BLOCK_M queries of one KV head.
    kernel 1 (_partial_kernel), grid (tiles, kv heads): online softmax over the chunk in KV tiles
        of BLOCK_N tokens, S = Q[BLOCK_M, D] @ K^T[D, BLOCK_N] (tl.dot), O += P @ V; writes the
        normalised partial o [pairs, Hq, D] fp32 and its log2-sum-exp [pairs, Hq], one pair
        per (chunk, branch).
    kernel 2 (_merge_kernel), grid (branches, head blocks): log-sum-exp merge of each branch's
        pairs (CSR list) into out [B, Hq, D] in q's dtype.

Segments and their plan: :mod:`.prefix_segments`. In this module, in order: the torch reference,
the two kernels and their launcher, and the public dispatch. CPU tensors take the reference (the CPU path).
benchmarks/shared_prefix_attention.py times it against per-branch attention. H200, triton 3.6,
Llama-8B layer, 8192-token prefix + 128-token tails, bf16: B=256 0.20 ms (torch SDPA on
pre-gathered per-branch KV 1.90 ms), of which the prefix launch (256 programs x 4096 tokens,
BLOCK_M 64) ~0.145 ms (~235 TFLOP/s: compute-bound there) and the tails ~0.05 ms (2.6 TB/s);
B=4 0.045-0.06 ms (host-bound: 2-3 launches through JITFunction.run). Swept: BLOCK_N
32/64/128, 4/8 warps, 2-4 stages: 64 / 4 / 2-3 best or within ~5% in isolation; whole calls
with 2 stages were slower at B=16/64 in one run (noisy), so 3.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .prefix_segments import Segment, SegmentPlan, host_ints, plan_segments

LOG2E = 1.4426950408889634


def shared_prefix_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    segments: Sequence[Segment] | SegmentPlan,
    scale: float,
) -> torch.Tensor:
    """Per branch: concatenate the K/V tokens of its segments, softmax(q K^T * scale) V in
    fp32 (query head h reads KV head h // G); returns ``[B, num_q_heads, head_dim]`` in q's dtype."""
    if isinstance(segments, SegmentPlan):
        segments = segments.segments
    num_branches, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    keys: list[list[torch.Tensor]] = [[] for _ in range(num_branches)]
    values: list[list[torch.Tensor]] = [[] for _ in range(num_branches)]
    for seg in segments:
        ids = torch.as_tensor(host_ints(seg.block_table), dtype=torch.long, device=q.device)
        k = key_cache[ids].reshape(-1, num_kv_heads, head_dim)[: seg.num_tokens]
        v = value_cache[ids].reshape(-1, num_kv_heads, head_dim)[: seg.num_tokens]
        for b in host_ints(seg.branches):
            keys[b].append(k)
            values[b].append(v)
    out = torch.empty_like(q)
    for b in range(num_branches):
        k = torch.cat(keys[b]).float().repeat_interleave(group, dim=1)  # [T, Hq, D]
        v = torch.cat(values[b]).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].float(), k) * scale
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Triton: kernel 1 (partials per chunk and branch) and kernel 2 (log-sum-exp merge).


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    tiles_ptr,
    seg_branches_ptr,
    po_ptr,
    plse_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    qk_scale,
    NUM_Q_HEADS: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tiles_ptr + tl.program_id(0) * 8
    kvh = tl.program_id(1)
    table = tables_ptr + tl.load(tile)
    tok_start = tl.load(tile + 1)
    tok_end = tl.load(tile + 2)
    pair0 = tl.load(tile + 3)
    branch_off = tl.load(tile + 4)
    n_branches = tl.load(tile + 5)
    rows = tl.load(tile + 6) + tl.arange(0, BLOCK_M)
    j = rows // G  # branch of the segment
    head = kvh * G + rows % G  # query head
    row_ok = j < n_branches
    d = tl.arange(0, HEAD_DIM)
    branch = tl.load(seg_branches_ptr + branch_off + j, mask=row_ok, other=0).to(tl.int64)
    q_offs = branch[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(tok_start, tok_end, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        tok_ok = toks < tok_end
        blk = tl.load(table + toks // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        kv_offs = blk * stride_kb + (toks % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        k = tl.load(k_ptr + kv_offs[None, :] + d[:, None], mask=tok_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision="ieee") * qk_scale  # log2 units
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offs[:, None] + d[None, :], mask=tok_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    pair = (pair0 + j).to(tl.int64) * NUM_Q_HEADS + head
    tl.store(po_ptr + pair[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None], row_ok[:, None])
    tl.store(plse_ptr + pair, m_i + tl.log2(l_i), row_ok)


@triton.jit
def _merge_kernel(
    po_ptr,
    plse_ptr,
    branch_ptr,
    branch_pairs_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = head < NUM_Q_HEADS
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for i in range(tl.load(branch_ptr + b), tl.load(branch_ptr + b + 1)):
        row = tl.load(branch_pairs_ptr + i).to(tl.int64) * NUM_Q_HEADS + head
        lse = tl.load(plse_ptr + row, mask=head_ok, other=0.0)
        o = tl.load(po_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=head_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
    out = acc / l_i[:, None]
    offs = b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def _empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """fp32 workspace for the partials (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check_inputs(q, key_cache, value_cache, plan: SegmentPlan) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("key_cache and value_cache must have the same shape and strides")
    if q.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, caches {key_cache.dtype}")
    expected = (plan.num_branches, plan.num_q_heads, head_dim)
    if tuple(q.shape) != expected or q.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError(f"q must be {expected} with unit last strides, got {tuple(q.shape)}")
    if (block_size, num_kv_heads) != (plan.block_size, plan.num_kv_heads):
        raise ValueError(f"cache has block_size {block_size}, {num_kv_heads} kv heads; plan not")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 16")
    if plan.max_block_id >= num_blocks:
        raise ValueError(f"block id {plan.max_block_id} out of range for {num_blocks} blocks")


def _shared_prefix_attention_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: SegmentPlan,
    scale: float,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    _check_inputs(q, key_cache, value_cache, plan)
    head_dim = q.shape[-1]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with unit last stride")
    if block_n is None:
        block_n = 32 if q.element_size() == 4 else 64
    po = _empty((plan.num_pairs, plan.num_q_heads, head_dim), q.device)
    plse = _empty((plan.num_pairs, plan.num_q_heads), q.device)
    for block_m, tiles in plan.launches:
        _partial_kernel[(tiles.shape[0], plan.num_kv_heads)](
            q,
            key_cache,
            value_cache,
            plan.block_tables,
            tiles,
            plan.seg_branches,
            po,
            plse,
            q.stride(0),
            q.stride(1),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            scale * LOG2E,
            NUM_Q_HEADS=plan.num_q_heads,
            G=plan.num_q_heads // plan.num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=plan.block_size,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    block_h = min(16, triton.next_power_of_2(plan.num_q_heads))
    _merge_kernel[(plan.num_branches, triton.cdiv(plan.num_q_heads, block_h))](
        po,
        plse,
        plan.branch_ptr,
        plan.branch_pairs,
        out,
        out.stride(0),
        out.stride(1),
        NUM_Q_HEADS=plan.num_q_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Public dispatch.


def shared_prefix_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    segments: Sequence[Segment] | SegmentPlan,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of ``q`` ``[B, num_q_heads, head_dim]`` over the KV tokens of each
    branch's segments; returns ``[B, num_q_heads, head_dim]`` in q's dtype (``out`` if given).

    ``scale`` defaults to ``head_dim ** -0.5``. ``segments`` may be a prebuilt
    :class:`SegmentPlan` (build one per batch, reuse it for every layer). CUDA: two Triton
    kernels (partials, merge); CPU: :func:`shared_prefix_attention_reference`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    plan = segments
    if not isinstance(plan, SegmentPlan):
        _, block_size, num_kv_heads, _ = key_cache.shape
        plan = plan_segments(segments, q.shape[0], q.shape[1], num_kv_heads, block_size, q.device)
    if q.device.type != "cuda":
        _check_inputs(q, key_cache, value_cache, plan)
        result = shared_prefix_attention_reference(q, key_cache, value_cache, plan, scale)
        return result if out is None else out.copy_(result)
    return _shared_prefix_attention_triton(q, key_cache, value_cache, plan, scale, out)


__all__ = [
    "Segment",
    "SegmentPlan",
    "plan_segments",
    "shared_prefix_attention",
    "shared_prefix_attention_reference",
]
