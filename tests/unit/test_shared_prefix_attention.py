"""thaw_kernels.shared_prefix_attention: cascade decode attention over shared KV segments.

Fresh random caches (block ids permuted, non-contiguous), random trees of segments (a level-0
prefix, optional level-1 groups of shuffled branches, per-branch tails ending mid-block, or one
flat table per branch whose leading blocks are shared), NaN-poisoned outputs and partials; see
kernel_cases.py for the three ways a kernel runs here:

- CPU: the reference against a float64 per-token oracle, the public CPU path, the plan's
  validation and its decomposition (every branch's tokens covered once, every row once).
- Interpreter (``test_interp_*``): both Triton kernels on CPU tensors, in this process.
- Offline compile (CPU machines): both kernels compile for sm_90.
- GPU (``-m gpu``, needs CUDA): the compiled kernels against the reference on CUDA tensors.
"""

from __future__ import annotations

import importlib
import math
import random

import numpy as np
import pytest
import torch
from kernel_cases import (
    compile_sm90,
    gpu,
    interpret_kernels,
    needs_cuda,
    offline_compile,
    require_nvidia_backend,
)

from thaw_kernels import (
    Segment,
    plan_segments,
    shared_prefix_attention,
    shared_prefix_attention_reference,
)

# The package's attribute of that name is the function; the module is in sys.modules.
spa_mod = importlib.import_module("thaw_kernels.prefix_attention")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------------------------
# Cases and oracles.


def make_case(
    seed: int,
    branches: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    prefix: int,
    tail_max: int,
    levels: int = 1,
    block_size: int = 4,
    flat: bool = False,
    device: str = "cpu",
):
    """(q, key_cache, value_cache, segments): a random tree over a cache of permuted blocks.

    ``levels`` 1: a prefix of ``prefix`` tokens for all branches + tails of 1..tail_max tokens;
    2: also level-1 prefixes of 1..prefix tokens, each for a shuffled group of branches (some
    branches in none). ``flat``: one segment per branch, its table = prefix blocks + its own.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    per = lambda n: -(-n // block_size)  # noqa: E731
    pre_blocks = per(prefix)
    if flat and prefix % block_size:
        prefix = pre_blocks * block_size  # a flat table continues after whole blocks
    tails = [rng.randint(1, tail_max) for _ in range(branches)]
    groups: list[tuple[list[int], int]] = []
    if levels == 2:
        order = list(range(branches))
        rng.shuffle(order)
        cut = sorted(rng.sample(range(1, branches), min(2, branches - 1))) if branches > 1 else []
        for part in np.split(np.array(order), cut):
            if len(part) and rng.random() < 0.8:
                groups.append((part.tolist(), rng.randint(1, prefix)))
    total = pre_blocks + sum(per(n) for _, n in groups) + sum(per(n) for n in tails) + 3
    ids = torch.randperm(total + 5)[:total].tolist()  # unused blocks and holes in between
    take = lambda n: [ids.pop() for _ in range(per(n))]  # noqa: E731
    shape = (total + 5, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, device=device).to(dtype)
    value_cache = torch.randn(shape, device=device).to(dtype)
    q = torch.randn(branches, kv_heads * group, head_dim, device=device).to(dtype)
    prefix_table = take(prefix)
    if flat:
        segments = [
            Segment(torch.tensor(prefix_table + take(n), dtype=torch.int32), prefix + n, [b])
            for b, n in enumerate(tails)
        ]
        return q, key_cache, value_cache, segments
    segments = [
        Segment(torch.tensor(prefix_table, dtype=torch.int32), prefix, list(range(branches)))
    ]
    segments += [Segment(take(n), n, torch.tensor(members)) for members, n in groups]
    segments += [Segment(take(n), n, [b]) for b, n in enumerate(tails)]
    rng.shuffle(segments)
    return q, key_cache, value_cache, segments


def naive_attention(q, key_cache, value_cache, segments, scale) -> torch.Tensor:
    """float64, token by token from (block, offset) addresses, per branch and query head."""
    branches, num_q_heads, head_dim = q.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    out = torch.zeros(branches, num_q_heads, head_dim, dtype=torch.float64)
    for b in range(branches):
        addrs = [
            (int(seg.block_table[t // block_size]), t % block_size)
            for seg in segments
            if b in [int(x) for x in seg.branches]
            for t in range(seg.num_tokens)
        ]
        for h in range(num_q_heads):
            kvh = h // (num_q_heads // kv_heads)
            ks = torch.stack([key_cache[blk, off, kvh].double() for blk, off in addrs])
            vs = torch.stack([value_cache[blk, off, kvh].double() for blk, off in addrs])
            logits = [float(ks[t] @ q[b, h].double()) * scale for t in range(len(addrs))]
            top = max(logits)
            weights = torch.tensor([math.exp(x - top) for x in logits], dtype=torch.float64)
            out[b, h] = (weights[:, None] * vs).sum(0) / weights.sum()
    return out


def check_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite elements (unwritten output?)"
    tol = TOL[dtype]
    err = (got.float() - want.float()).abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=f"{what}: {err}")


def nan_workspace(monkeypatch) -> None:
    """The partials buffers start as NaN: a partial the merge reads unwritten shows."""

    def empty(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(spa_mod, "_empty", empty)


def run_kernel(q, key_cache, value_cache, segments, **plan_kwargs) -> torch.Tensor:
    kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    plan = plan_segments(
        segments, q.shape[0], q.shape[1], kv_heads, block_size, q.device, **plan_kwargs
    )
    out = torch.full_like(q, float("nan"))
    scale = q.shape[-1] ** -0.5
    got = spa_mod._shared_prefix_attention_triton(q, key_cache, value_cache, plan, scale, out)
    assert got.data_ptr() == out.data_ptr()
    return got


# ---------------------------------------------------------------------------------------------
# CPU: reference, public path, plan.


@pytest.mark.parametrize("levels,flat", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("group", [1, 4])
def test_reference_matches_naive(levels, flat, group):
    seed = random.randrange(2**31)
    q, kc, vc, segs = make_case(seed, 5, 2, group, 16, torch.float32, 9, 6, levels, 4, flat)
    got = shared_prefix_attention_reference(q, kc, vc, segs, 0.3)
    want = naive_attention(q, kc, vc, segs, 0.3).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_cpu_path(dtype):
    seed = random.randrange(2**31)
    q, kc, vc, segs = make_case(seed, 4, 2, 4, 32, dtype, 11, 7, levels=2)
    want = shared_prefix_attention_reference(q, kc, vc, segs, 32**-0.5)
    assert torch.equal(shared_prefix_attention(q, kc, vc, segs), want), f"seed {seed}"
    plan = plan_segments(segs, 4, 8, 2, 4)
    out = torch.full_like(q, float("nan"))
    assert shared_prefix_attention(q, kc, vc, plan, 32**-0.5, out=out) is out
    assert torch.equal(out, want), f"seed {seed}"


def test_plan_validation():
    kc = torch.zeros(6, 4, 1, 16)
    q = torch.zeros(2, 2, 16)
    ok = Segment([0, 1], 5, [0, 1])
    cases = [
        ([Segment([0], 5, [0, 1])], "do not fit"),
        ([ok, Segment([2], 1, [2])], "not distinct"),
        ([ok, Segment([2], 1, [1, 1])], "not distinct"),
        ([Segment([0, 1], 5, [0])], "attend to no token"),
        ([ok, Segment([-1], 1, [0])], "negative block id"),
        ([ok, Segment([9], 1, [0])], "out of range"),
    ]
    for segs, message in cases:
        with pytest.raises(ValueError, match=message):
            shared_prefix_attention(q, kc, kc, segs)
    with pytest.raises(ValueError, match="multiple"):
        plan_segments([ok], 2, 3, 2, 4)
    with pytest.raises(ValueError, match="dtypes differ"):
        shared_prefix_attention(q.double(), kc, kc, [ok])


@pytest.mark.parametrize("branches,group,block_m", [(3, 4, None), (40, 8, None), (70, 1, 16)])
@pytest.mark.parametrize("chunk_tokens", [None, 16, 48])
def test_plan_covers_every_token_and_row_once(branches, group, block_m, chunk_tokens):
    """Decoding the packed plan: each branch's pairs cover exactly its segments' tokens, each
    chunk's tiles cover all its (branch, head) rows, the tables are the segments' blocks."""
    seed = random.randrange(2**31)
    _, _, _, segs = make_case(seed, branches, 1, 1, 16, torch.float32, 700, 50, levels=2)
    plan = plan_segments(segs, branches, 2 * group, 2, 4, "cpu", chunk_tokens, block_m, 132)
    kept = [s for s in plan.segments if s.num_tokens and len(s.branches)]
    offsets, at = {}, 0
    for i, seg in enumerate(kept):
        offsets[at] = i
        n_blocks = -(-seg.num_tokens // 4)
        want_table = [int(x) for x in seg.block_table[:n_blocks]]
        assert plan.block_tables[at : at + n_blocks].tolist() == want_table, f"seed {seed}"
        at += n_blocks
    pair_chunk: dict[int, tuple[int, int, int]] = {}
    chunk_rows: dict[tuple[int, int, int], set[int]] = {}
    seg_branches = plan.seg_branches.tolist()
    for bm, tiles in plan.launches:
        assert block_m in (None, bm), f"seed {seed}"
        for table_off, start, end, pair0, off, n, m0, _ in tiles.tolist():
            seg = offsets[table_off]
            assert 0 <= start < end <= kept[seg].num_tokens, f"seed {seed}"
            chunk = (seg, start, end)
            chunk_rows.setdefault(chunk, set()).update(range(m0, min(m0 + bm, n * group)))
            assert seg_branches[off : off + n] == [int(b) for b in kept[seg].branches]
            for j in range(n):
                assert pair_chunk.setdefault(pair0 + j, chunk) == chunk, f"seed {seed}"
    assert sorted(pair_chunk) == list(range(plan.num_pairs)), f"seed {seed}"
    for (seg, _, _), rows in chunk_rows.items():
        assert rows == set(range(len(kept[seg].branches) * group)), f"seed {seed}"
    ptr, pairs = plan.branch_ptr.tolist(), plan.branch_pairs.tolist()
    for b in range(branches):
        chunks = [pair_chunk[p] for p in pairs[ptr[b] : ptr[b + 1]]]
        tokens = sorted((seg, t) for seg, start, end in chunks for t in range(start, end))
        want = sorted(
            (s, t)
            for s, seg in enumerate(kept)
            if b in [int(x) for x in seg.branches]
            for t in range(seg.num_tokens)
        )
        assert tokens == want, f"seed {seed}, branch {b}"


# ---------------------------------------------------------------------------------------------
# Both kernels under the interpreter.


def _interpreter_bf16_dot(monkeypatch) -> None:
    """Triton's interpreter multiplies bf16 operands as their uint16 storage: widen them."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype != tl.bfloat16:
            return t
        data = (t.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, *args):
        return original(self, widen(a), widen(b), *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def interpreter(monkeypatch):
    interpret_kernels(monkeypatch, spa_mod)
    _interpreter_bf16_dot(monkeypatch)
    nan_workspace(monkeypatch)


# (branches, kv_heads, group, head_dim, dtype, prefix, tail_max, levels, flat, chunk, block_m)
INTERP_CASES = [
    (3, 2, 4, 16, torch.float32, 37, 9, 1, False, 16, None),  # prefix ends mid-block, chunks
    (5, 1, 8, 64, torch.float32, 21, 5, 2, False, None, None),  # two levels, G=8, one chunk
    (4, 2, 1, 32, torch.bfloat16, 30, 6, 2, False, 16, None),  # G=1, bf16, BLOCK_M=16 only
    (6, 2, 4, 16, torch.float16, 17, 7, 1, True, 16, None),  # flat tables, shared leading blocks
    (9, 1, 4, 16, torch.bfloat16, 25, 4, 2, False, 32, 16),  # 36 rows over BLOCK_M=16 tiles
]


@pytest.mark.parametrize("case", INTERP_CASES)
def test_interp_matches_reference(interpreter, case):
    *shape, levels, flat, chunk, block_m = case
    seed = random.randrange(2**31)
    q, kc, vc, segs = make_case(seed, *shape, levels=levels, flat=flat)
    got = run_kernel(q, kc, vc, segs, chunk_tokens=chunk, block_m=block_m)
    want = shared_prefix_attention_reference(q, kc, vc, segs, q.shape[-1] ** -0.5)
    check_close(got, want, q.dtype, f"seed {seed}")


def test_interp_strided_q_and_block_size_16(interpreter):
    seed = random.randrange(2**31)
    q, kc, vc, segs = make_case(seed, 3, 2, 2, 16, torch.float32, 40, 20, 2, block_size=16)
    wide = torch.full((3, 4, 32), float("nan"))
    wide[:, :, :16] = q
    q = wide[:, :, :16]  # rows 32 elements apart
    want = shared_prefix_attention_reference(q, kc, vc, segs, 0.25)
    plan = plan_segments(segs, 3, 4, 2, 16, chunk_tokens=16)
    got = spa_mod._shared_prefix_attention_triton(q, kc, vc, plan, 0.25, block_n=16)
    check_close(got, want, torch.float32, f"seed {seed}")


# ---------------------------------------------------------------------------------------------
# Offline compile for sm_90.

PARTIAL_SIG = dict(
    q_ptr="*bf16",
    k_ptr="*bf16",
    v_ptr="*bf16",
    tables_ptr="*i32",
    tiles_ptr="*i32",
    seg_branches_ptr="*i32",
    po_ptr="*fp32",
    plse_ptr="*fp32",
    stride_qb="i32",
    stride_qh="i32",
    stride_kb="i32",
    stride_kt="i32",
    stride_kh="i32",
    qk_scale="fp32",
)


@offline_compile
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "dtype,block_m,block_n", [("bf16", 64, 64), ("bf16", 16, 64), ("fp32", 64, 32)]
)
def test_kernels_compile_for_sm90(dtype, block_m, block_n):
    require_nvidia_backend()
    sig = {
        k: (f"*{dtype}" if k in ("q_ptr", "k_ptr", "v_ptr") else v) for k, v in PARTIAL_SIG.items()
    }
    consts = dict(
        NUM_Q_HEADS=32, G=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=block_m, BLOCK_N=block_n
    )
    ptx = compile_sm90(spa_mod._partial_kernel, sig, consts, [k for k in sig if k.endswith("_ptr")])
    assert ("mma" in ptx) == (dtype != "fp32") and "ex2.approx" in ptx
    merge_sig = dict(
        po_ptr="*fp32",
        plse_ptr="*fp32",
        branch_ptr="*i32",
        branch_pairs_ptr="*i32",
        out_ptr=f"*{dtype}",
        stride_ob="i32",
        stride_oh="i32",
    )
    merge = dict(NUM_Q_HEADS=32, HEAD_DIM=128, BLOCK_H=16)
    assert "st.global" in compile_sm90(spa_mod._merge_kernel, merge_sig, merge, ["po_ptr"])


# ---------------------------------------------------------------------------------------------
# Compiled kernels on CUDA.

GPU_CASES = [
    # (branches, kv_heads, group, head_dim, dtype, prefix, tail_max, levels, flat)
    (1, 8, 4, 128, torch.bfloat16, 1000, 100, 1, False),
    (7, 8, 4, 128, torch.float32, 777, 300, 2, False),
    (16, 2, 8, 64, torch.float16, 2049, 17, 2, False),
    (33, 4, 1, 128, torch.bfloat16, 513, 64, 2, False),
    (300, 8, 4, 128, torch.bfloat16, 1500, 256, 2, False),
    (20, 4, 8, 64, torch.float32, 300, 40, 1, True),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("chunk_tokens,block_m", [(None, None), (64, 64)])
def test_matches_reference_cuda(monkeypatch, case, chunk_tokens, block_m):
    nan_workspace(monkeypatch)
    *shape, levels, flat = case
    seed = random.randrange(2**31)
    q, kc, vc, segs = make_case(seed, *shape, levels, 16, flat, device="cuda")
    got = run_kernel(q, kc, vc, segs, chunk_tokens=chunk_tokens, block_m=block_m)
    want = shared_prefix_attention_reference(q, kc, vc, segs, q.shape[-1] ** -0.5)
    check_close(got, want, q.dtype, f"seed {seed}")


@gpu
@needs_cuda
def test_public_path_llama_shape_cuda():
    """Llama-3.1-8B: 32/8 heads, head_dim 128, bf16; 8192-token prefix, 64 branches; a plan
    reused gives the same bits, and the public call (plan built inside) agrees."""
    seed = random.randrange(2**31)
    q, kc, vc, segs = make_case(
        seed, 64, 8, 4, 128, torch.bfloat16, 8192, 256, 1, 16, False, "cuda"
    )
    plan = plan_segments(segs, 64, 32, 8, 16, "cuda")
    first = shared_prefix_attention(q, kc, vc, plan)
    assert torch.equal(shared_prefix_attention(q, kc, vc, plan), first)
    assert torch.equal(shared_prefix_attention(q, kc, vc, segs), first)
    want = shared_prefix_attention_reference(q, kc, vc, segs, 128**-0.5)
    check_close(first, want, torch.bfloat16, f"seed {seed}")
