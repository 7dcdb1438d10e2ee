"""thaw_kernels.kv_blocks: gather/scatter KV-cache blocks (and kv_pages, block_ids beneath it).

All comparisons are exact (integer views + torch.equal), on fresh random caches, into poisoned
outputs; see kernel_cases.py for the helpers and the three ways a kernel runs here:

- CPU: the public dispatch (torch: one strided index_select when the layers share a buffer, else
  the per-layer reference) and the references, against independent oracles written from the
  layout definitions; error messages; the page spec; host-side ids; the layers plan cache.
- Interpreter (``test_interp_*``): the Triton kernel on CPU tensors, in this process.
- Offline compile (CPU machines): the kernel compiles for sm_90 with 128-bit accesses.
- GPU (``-m gpu``, needs CUDA): the compiled kernel against the references on CUDA tensors.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from kernel_cases import (
    DTYPES,
    bits,
    compile_sm90,
    gpu,
    interpret_kernels,
    needs_cuda,
    offline_compile,
    poisoned,
    random_bits,
    require_nvidia_backend,
    same_bits,
)

from thaw_kernels import (
    KVPageSpec,
    id_staging,
    kv_gather,
    kv_gather_reference,
    kv_plans,
    kv_scatter,
    kv_scatter_reference,
    page_spec_for,
)
from thaw_kernels import block_ids as block_ids_mod
from thaw_kernels import kv_blocks as kv_mod

# (layout, num_blocks, block_size, kv_heads, head_dim): page sizes 30 and 36 (odd, not a power of two,
# tail masks), 2048 (even tiles), and a 1-block cache.
SHAPES = [
    ("flash", 7, 3, 2, 5),
    ("flash", 5, 16, 2, 64),
    ("flash", 1, 2, 1, 3),
    ("flash_interleaved", 6, 4, 3, 5),  # [blocks, 2, ...] allocation seen as [2, blocks, ...]
    ("cpu", 6, 2, 3, 3),
    ("cpu", 4, 16, 2, 32),
]


# ---------------------------------------------------------------------------------------------
# Helpers and oracles.


def make_cache(shape_case, n_layers: int, dtype, stacked: bool, device="cpu"):
    """Random cache in the given layout, as a list of separate allocations or one stacked tensor."""
    layout, nb, bs, kvh, hd = shape_case
    if layout == "cpu":
        shape = (nb, kvh, bs, 2 * hd)
    elif layout == "flash":
        shape = (2, nb, bs, kvh, hd)
    else:
        shape = (nb, 2, bs, kvh, hd)
    if stacked:
        layers = random_bits((n_layers, *shape), dtype, device)
        if layout == "flash_interleaved":
            layers = layers.transpose(1, 2)
        first = layers[0]
    else:
        layers = [random_bits(shape, dtype, device) for _ in range(n_layers)]
        if layout == "flash_interleaved":
            layers = [t.transpose(0, 1) for t in layers]
        first = layers[0]
    return layers, page_spec_for(first, "cpu" if layout == "cpu" else "flash")


def oracle_pages(layer: torch.Tensor, cpu_layout: bool, block: int) -> list[torch.Tensor]:
    raw = bits(layer)
    return (
        [raw[block].reshape(-1)]
        if cpu_layout
        else [raw[0, block].reshape(-1), raw[1, block].reshape(-1)]
    )


def oracle_gather(layers, ids, cpu_layout: bool) -> torch.Tensor:
    """[n, L, H, P] raw bits, written from the layout definition (not from KVPageSpec)."""
    return torch.stack(
        [
            torch.stack([torch.stack(oracle_pages(layer, cpu_layout, b)) for layer in layers])
            for b in ids
        ]
    )


def oracle_scatter(src: torch.Tensor, layers, ids, cpu_layout: bool) -> None:
    raw_src = bits(src)
    for i, b in enumerate(ids):
        for li, layer in enumerate(layers):
            raw_layer = bits(layer)
            for h in range(1 if cpu_layout else 2):
                dst = raw_layer[b] if cpu_layout else raw_layer[h, b]
                dst.copy_(raw_src[i, li, h].view(dst.shape))


def random_ids(num_blocks: int, n: int, unique: bool) -> list[int]:
    if unique:
        return torch.randperm(num_blocks)[:n].tolist()
    ids = torch.randint(0, num_blocks, (n,)).tolist()
    return ids + ids[:1]  # at least one repeat, unsorted


def check_gather_scatter(
    gather, scatter, shape_case, dtype, stacked, device="cpu", n_layers=3, **tile
):
    layers, spec = make_cache(shape_case, n_layers, dtype, stacked, device)
    cpu_layout = shape_case[0] == "cpu"
    ids = random_ids(spec.num_blocks, max(1, spec.num_blocks - 2), unique=False)
    out = poisoned((len(ids), n_layers, spec.num_halves, spec.page_elems), dtype, device)
    got = gather(layers, ids, spec, out=out, **tile)
    assert got.data_ptr() == out.data_ptr()
    assert same_bits(got, oracle_gather(layers, ids, cpu_layout))

    ids = random_ids(spec.num_blocks, max(1, spec.num_blocks - 1), unique=True)
    src = random_bits((len(ids), n_layers, spec.num_halves, spec.page_elems), dtype, device)
    expected = [t.clone() for t in layers]
    oracle_scatter(src, expected, ids, cpu_layout)
    scatter(src, layers, ids, spec, **tile)
    assert all(same_bits(a, b) for a, b in zip(layers, expected))


@pytest.fixture(params=id_staging.HOST_PATHS)
def host_path(request, monkeypatch):
    """Each CUDA host path of the public calls (id_staging.py), set for this test."""
    monkeypatch.setattr(id_staging, "HOST_PATH", request.param)
    return request.param


@pytest.fixture
def interpreter(monkeypatch):
    """kv_blocks' Triton kernel runs under the interpreter for this test (CPU tensors)."""
    interpret_kernels(monkeypatch, kv_mod)


# ---------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter.


@pytest.mark.parametrize("shape_case", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stacked", [False, True])
def test_interp_kv_gather_scatter(interpreter, shape_case, dtype, stacked):
    check_gather_scatter(
        kv_mod._kv_gather_triton, kv_mod._kv_scatter_triton, shape_case, dtype, stacked
    )


@pytest.mark.parametrize("block", [8, 32])
def test_interp_kv_small_tiles(interpreter, block):
    """Several programs per page, the last one masked."""
    check_gather_scatter(
        kv_mod._kv_gather_triton,
        kv_mod._kv_scatter_triton,
        ("flash", 4, 3, 2, 7),
        torch.bfloat16,
        False,
        block=block,
    )


def test_interp_kv_misaligned_layers(interpreter):
    """Layer bases 73 elements apart: the kernel must fall back to ALIGN=1, not misaddress."""
    big = random_bits((2 * 3 * 4 * 8 * 3 + 1,), torch.float16)
    layers = [big[i * 72 + i : i * 72 + i + 72].view(3, 4, 2, 3) for i in range(2)]  # cpu layout
    spec = page_spec_for(layers[0], "cpu")
    assert kv_plans.alignment(layers, spec) == 1
    ids = [2, 0, 2]
    assert same_bits(kv_mod._kv_gather_triton(layers, ids, spec), oracle_gather(layers, ids, True))


def test_interp_kv_plan_cache_stays_exact(interpreter):
    """Cached plans: reused for the same tensors, rebuilt for other pointers or objects; exact either way."""
    layers, spec = make_cache(("flash", 6, 4, 2, 8), 3, torch.bfloat16, False)
    for ids in ([5, 0, 3], [2, 2], torch.tensor([1, 4], dtype=torch.int32)):
        got = kv_mod._kv_gather_triton(layers, ids, spec)
        assert same_bits(got, oracle_gather(layers, [int(i) for i in ids], False))
    plan = kv_plans.plan_for(layers, spec)[0]
    other = [t.clone() for t in reversed(layers)]  # other pointers, lowest layer not first
    assert same_bits(
        kv_mod._kv_gather_triton(other, [4, 1], spec), oracle_gather(other, [4, 1], False)
    )
    assert kv_plans.plan_for(other, spec)[0] is not plan
    views = [t.view(t.shape) for t in layers]  # same pointers, new objects: checked again
    assert same_bits(
        kv_mod._kv_gather_triton(views, [0, 5], spec), oracle_gather(layers, [0, 5], False)
    )
    src = random_bits((2, 3, 2, spec.page_elems), torch.bfloat16)
    expected = [t.clone() for t in other]
    oracle_scatter(src, expected, [3, 0], False)
    kv_mod._kv_scatter_triton(src, other, [3, 0], spec)
    assert all(same_bits(a, b) for a, b in zip(other, expected))
    with pytest.raises(ValueError, match=r"block id 6 out of range: the cache has 6 blocks"):
        kv_mod._kv_gather_triton(layers, [0, 6], spec)  # a cached plan still checks the ids
    with pytest.raises(ValueError, match=r"block_ids has repeats"):
        kv_mod._kv_scatter_triton(src, other, [1, 1], spec)


# ---------------------------------------------------------------------------------------------
# CPU dispatch (the product's CPU path) and the references.


@pytest.mark.parametrize("shape_case", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("ops", ["dispatch", "reference"])
def test_kv_gather_scatter_cpu(shape_case, dtype, stacked, ops):
    """dispatch: one strided index_select when stacked, the reference otherwise."""
    pair = (
        (kv_gather, kv_scatter)
        if ops == "dispatch"
        else (kv_gather_reference, kv_scatter_reference)
    )
    check_gather_scatter(*pair, shape_case, dtype, stacked)


def test_kv_cpu_fast_path_is_taken_only_for_one_buffer():
    stacked, spec = make_cache(SHAPES[0], 3, torch.float32, True)
    assert kv_mod._stacked_pages(list(stacked.unbind(0)), spec) is not None
    separate, spec = make_cache(SHAPES[0], 3, torch.float32, False)
    assert kv_mod._stacked_pages(separate, spec) is None
    interleaved = random_bits(
        (7, 3, 2, 3, 2, 5), torch.float32
    )  # [blocks, layers, ...]: layers overlap
    spec = page_spec_for(interleaved[:, 0].transpose(0, 1), "flash")
    assert kv_mod._stacked_pages(list(interleaved.unbind(1)), spec) is None


def test_kv_gather_allocates_and_keeps_nan_payloads():
    layers = [torch.empty(2, 3, 2, 1, 2) for _ in range(2)]
    nans = torch.tensor(
        [0x7F800001, 0x7FC12345, -1, 0xFF800002 - 2**32], dtype=torch.int32
    )  # sNaN, payloads
    for t in layers:
        bits(t).copy_(nans.repeat(6).view(t.shape))
    spec = page_spec_for(layers[0], "flash")
    out = kv_gather(layers, [2, 1], spec)
    assert out.shape == (2, 2, 2, 4) and out.dtype == torch.float32
    assert same_bits(out, oracle_gather(layers, [2, 1], False))
    assert same_bits(kv_gather_reference(layers, [2, 1], spec), out)


def test_kv_gather_empty_ids():
    layers, spec = make_cache(SHAPES[0], 2, torch.float16, False)
    assert kv_gather(layers, [], spec).shape == (0, 2, 2, spec.page_elems)
    kv_scatter(torch.empty(0, 2, 2, spec.page_elems, dtype=torch.float16), layers, [], spec)


def test_kv_block_ids_as_tensor():
    layers, spec = make_cache(SHAPES[1], 2, torch.bfloat16, True)
    ids = torch.tensor([4, 0, 3], dtype=torch.int32)
    assert same_bits(kv_gather(layers, ids, spec), oracle_gather(layers, ids.tolist(), False))


def test_page_spec_for_layouts():
    flash = torch.empty(2, 10, 16, 8, 4)
    assert page_spec_for(flash, "flash") == KVPageSpec(
        2, 16 * 8 * 4, 16 * 8 * 4, 10 * 16 * 8 * 4, 10
    )
    cpu = torch.empty(10, 8, 16, 8)
    assert page_spec_for(cpu, "cpu") == KVPageSpec(1, 8 * 16 * 8, 8 * 16 * 8, 0, 10)
    interleaved = torch.empty(10, 2, 16, 8, 4).transpose(0, 1)
    assert page_spec_for(interleaved, "flash") == KVPageSpec(2, 512, 1024, 512, 10)


def test_page_spec_errors():
    with pytest.raises(ValueError, match=r"must be contiguous.*strides are"):
        page_spec_for(torch.empty(2, 10, 8, 16, 4).transpose(2, 3), "flash")
    with pytest.raises(ValueError, match=r"flash layout wants \[2, num_blocks"):
        page_spec_for(torch.empty(10, 16, 8, 4), "flash")
    with pytest.raises(ValueError, match=r"cpu layout wants"):
        page_spec_for(torch.empty(2, 10, 16, 8, 4), "cpu")
    with pytest.raises(ValueError, match=r"layout must be 'flash' or 'cpu', got 'hnd'"):
        page_spec_for(torch.empty(2, 10, 16, 8, 4), "hnd")
    with pytest.raises(ValueError, match=r"K and V pages overlap"):
        KVPageSpec(num_halves=2, page_elems=8, block_stride=8, half_stride=4, num_blocks=3)
    with pytest.raises(ValueError, match=r"block_stride 4 < page_elems 8"):
        KVPageSpec(num_halves=1, page_elems=8, block_stride=4, half_stride=0, num_blocks=3)


def test_kv_input_errors():
    layers, spec = make_cache(("flash", 5, 2, 2, 3), 3, torch.float16, False)
    with pytest.raises(
        ValueError, match=r"block id 5 out of range: the cache has 5 blocks \(0\.\.4\)"
    ):
        kv_gather(layers, [0, 5], spec)
    with pytest.raises(ValueError, match=r"block id -1 out of range"):
        kv_gather(layers, [-1], spec)
    with pytest.raises(ValueError, match=r"1-D integer"):
        kv_gather(layers, torch.tensor([[0]]), spec)
    with pytest.raises(
        ValueError, match=r"layers\[1\] is torch.bfloat16 .* but layers\[0\] is torch.float16"
    ):
        kv_gather([layers[0], layers[1].to(torch.bfloat16)], [0], spec)
    with pytest.raises(ValueError, match=r"layers\[2\] is torch.float16 \(2, 4, 2, 2, 3\)"):
        kv_gather(layers[:2] + [layers[2][:, :4]], [0], spec)
    with pytest.raises(ValueError, match=r"out has 24 elements, expected 72 = \[1, 3, 2, 12\]"):
        kv_gather(layers, [0], spec, out=torch.empty(24, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out is torch.float32 on cpu, expected torch.float16"):
        kv_gather(layers, [0], spec, out=torch.empty(72))
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        kv_gather(layers, [0], spec, out=torch.empty(144, dtype=torch.float16)[::2])
    with pytest.raises(ValueError, match=r"src has 72 elements, expected 144"):
        kv_scatter(torch.empty(72, dtype=torch.float16), layers, [0, 1], spec)
    with pytest.raises(ValueError, match=r"block_ids has repeats"):
        kv_scatter(torch.empty(144, dtype=torch.float16), layers, [1, 1], spec)
    with pytest.raises(ValueError, match=r"spec spans 144 elements .* storage holds 120"):
        kv_gather(layers, [0], KVPageSpec(2, 12, 12, 72, 6))
    with pytest.raises(ValueError, match=r"layers is empty"):
        kv_gather([], [0], spec)


def test_kv_triton_path_input_errors():
    """The Triton path validates before launching, so its errors are checked here on CPU tensors."""
    layers, spec = make_cache(("flash", 5, 2, 2, 3), 3, torch.float16, False)
    gather, scatter = kv_mod._kv_gather_triton, kv_mod._kv_scatter_triton
    src = torch.empty(144, dtype=torch.float16)
    for _ in range(2):  # building the plan, then with the plan cached
        with pytest.raises(
            ValueError, match=r"block id 5 out of range: the cache has 5 blocks \(0\.\.4\)"
        ):
            gather(layers, [0, 5], spec)
        with pytest.raises(ValueError, match=r"block id -1 out of range"):
            gather(layers, np.array([-1]), spec)
        with pytest.raises(ValueError, match=r"block id 7 out of range"):
            gather(layers, torch.tensor([7, 0], dtype=torch.int32), spec)
        with pytest.raises(
            ValueError, match=r"1-D integer sequence, got torch.float32 shape \(2,\)"
        ):
            gather(layers, [0.0, 1.5], spec)
        with pytest.raises(ValueError, match=r"1-D integer sequence, got torch.bool"):
            gather(layers, [True], spec)
        with pytest.raises(
            ValueError, match=r"1-D integer sequence, got torch.int64 shape \(1, 1\)"
        ):
            gather(layers, [[0]], spec)
        with pytest.raises(ValueError, match=r"1-D integer sequence, got torch.float16"):
            gather(layers, torch.tensor([0.0], dtype=torch.float16), spec)
        with pytest.raises(ValueError, match=r"block_ids has repeats"):
            scatter(src, layers, (1, 1), spec)
        with pytest.raises(ValueError, match=r"src has 144 elements, expected 216"):
            scatter(src, layers, [0, 1, 2], spec)
        with pytest.raises(ValueError, match=r"out has 24 elements, expected 72"):
            gather(layers, [0], spec, out=torch.empty(24, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"layers\[2\] is torch.int16 .* all must match"):
        gather(
            layers[:2] + [layers[2].view(torch.int16)], [0], spec
        )  # same pointers, so same cache key
    with pytest.raises(ValueError, match=r"spec spans 144 elements .* storage holds 120"):
        gather(layers, [0], KVPageSpec(2, 12, 12, 72, 6))
    with pytest.raises(ValueError, match=r"layers is empty"):
        gather([], [0], spec)
    with pytest.raises(TypeError, match=r"layers\[1\] is int, expected a torch.Tensor"):
        gather([layers[0], 3], [0], spec)


def test_kv_host_ids():
    spec = KVPageSpec(1, 4, 4, 0, 10)
    for ids in (
        [3, 0, 9],
        (3, 0, 9),
        range(3),
        np.array([3, 0], dtype=np.uint8),
        torch.tensor([9, 1], dtype=torch.int16),
        torch.arange(10)[::3],
        [np.int32(2)],
    ):
        arr = block_ids_mod.host_ids(ids, spec, unique=True)
        assert arr.dtype == np.int64 and arr.tolist() == [int(i) for i in ids]
    assert block_ids_mod.host_ids([], spec, unique=True).dtype == np.int64
    assert block_ids_mod.host_ids([4, 4], spec, unique=False).tolist() == [4, 4]
    assert (
        block_ids_mod.host_ids(torch.zeros(2, dtype=torch.int64, device="meta"), spec, unique=False)
        is None
    )


def test_kv_plan_cache_keys_and_lifetime():
    layers, spec = make_cache(SHAPES[1], 4, torch.bfloat16, False)
    plan, base = kv_plans.plan_for(layers, spec)
    assert (
        kv_plans.plan_for(layers, spec)[0] is plan
        and kv_plans.plan_for(tuple(layers), spec)[0] is plan
    )
    assert base is layers[plan.base] and plan.n_layers == 4 and plan.align == 8
    assert plan.offs.tolist() == [(t.data_ptr() - base.data_ptr()) // 16 for t in layers]
    assert kv_plans.plan_for(layers[:3], spec)[0] is not plan  # other pointers
    stacked, spec_s = make_cache(SHAPES[1], 4, torch.bfloat16, True)
    plan_s, base_s = kv_plans.plan_for(stacked, spec_s)
    assert (
        kv_plans.plan_for(stacked, spec_s)[0] is plan_s and base_s.data_ptr() == stacked.data_ptr()
    )
    assert kv_plans.plan_for(stacked[:3], spec_s)[0] is not plan_s  # same address, other shape
    ref = weakref.ref(layers[0])
    del layers, base, stacked, base_s
    gc.collect()
    assert ref() is None  # plans hold their layers weakly: a dead engine's cache is freed
    alive = [make_cache(SHAPES[0], 2, torch.float32, False) for _ in range(kv_plans.PLANS_MAX + 4)]
    first_plan = kv_plans.plan_for(*alive[0])[0]
    for more, spec_m in alive[1:]:
        kv_plans.plan_for(more, spec_m)
    assert (
        len(kv_plans.PLANS) == kv_plans.PLANS_MAX
    )  # least recently used dropped, rebuilt when needed
    assert kv_plans.plan_for(*alive[0])[0] is not first_plan


# ---------------------------------------------------------------------------------------------
# Offline compile for the H100/H200 (sm_90): catches compiler-only failures the interpreter cannot,
# and checks the copies vectorize to 16-byte accesses.


@offline_compile
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kv_kernel_compiles_for_sm90():
    require_nvidia_backend()
    kv_sig = dict(
        cache_ptr="*i16",
        layer_offs_ptr="*i64",
        block_ids_ptr="*i64",
        buf_ptr="*i16",
        n_layers="i32",
        page_units="i32",
        block_units="i32",
        half_units="i32",
    )
    for to_buf in (True, False):
        ptx = compile_sm90(
            kv_mod._kv_pages_kernel,
            kv_sig,
            dict(NUM_HALVES=2, ALIGN=8, BLOCK=4096, EVEN=False, TO_BUF=to_buf),
            ["cache_ptr", "layer_offs_ptr", "block_ids_ptr", "buf_ptr"],
        )
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx


# ---------------------------------------------------------------------------------------------
# Compiled kernel on CUDA.


@gpu
@needs_cuda
@pytest.mark.parametrize("shape_case", SHAPES + [("flash", 64, 16, 8, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stacked", [False, True])
def test_kv_gather_scatter_cuda(shape_case, dtype, stacked, host_path):
    check_gather_scatter(
        kv_gather, kv_scatter, shape_case, dtype, stacked, device="cuda", n_layers=4
    )
    torch.cuda.synchronize()


@gpu
@needs_cuda
@pytest.mark.parametrize("block", [64, 1024, 8192])
def test_kv_tiles_cuda(block):
    check_gather_scatter(
        kv_mod._kv_gather_triton,
        kv_mod._kv_scatter_triton,
        ("flash", 33, 16, 8, 128),
        torch.bfloat16,
        False,
        device="cuda",
        n_layers=5,
        block=block,
    )


@gpu
@needs_cuda
def test_kv_public_path_many_calls_cuda(host_path):
    """3x more calls than pinned id slots, never synced, one call past a slot's capacity: all exact."""
    layers, spec = make_cache(("flash", 3000, 16, 2, 64), 3, torch.bfloat16, False, "cuda")
    expected = [t.clone() for t in layers]
    calls = []  # in stream order: gathers see every earlier scatter
    for k in range(3 * id_staging.ID_SLOTS):
        n = 2000 if k == 2 * id_staging.ID_SLOTS else 1 + k
        ids = torch.randint(0, 3000, (n,)).tolist()
        calls.append(("gather", ids, kv_gather(layers, ids, spec)))
        ids = torch.randperm(3000)[:n].tolist()
        src = random_bits((n, 3, 2, spec.page_elems), torch.bfloat16, "cuda")
        kv_scatter(src, layers, ids, spec)
        calls.append(("scatter", ids, src))
    torch.cuda.synchronize()
    for op, ids, tensor in calls:
        if op == "gather":
            assert same_bits(tensor, oracle_gather(expected, ids, False))
        else:
            oracle_scatter(tensor, expected, ids, False)
    assert all(same_bits(a, b) for a, b in zip(layers, expected))


@gpu
@needs_cuda
def test_kv_gather_matches_reference_cuda():
    layers, spec = make_cache(("flash", 300, 16, 8, 128), 8, torch.bfloat16, False, "cuda")
    ids = torch.randint(0, 300, (65,), device="cuda")
    assert same_bits(kv_gather(layers, ids, spec), kv_gather_reference(layers, ids, spec))


@gpu
@needs_cuda
def test_kv_public_path_from_a_fresh_thread_cuda(host_path):
    """A thread that never touched CUDA (no current context): the stager's driver calls still run
    on the layers' device, and the results are exact."""
    import threading

    layers, spec = make_cache(("flash", 200, 16, 2, 64), 3, torch.bfloat16, False, "cuda")
    ids = random_ids(spec.num_blocks, 40, unique=True)
    src = random_bits((len(ids), 3, 2, spec.page_elems), torch.bfloat16, "cuda")
    expected = [t.clone() for t in layers]
    oracle_scatter(src, expected, ids, False)
    torch.cuda.synchronize()
    got: dict = {}

    def work() -> None:
        try:
            kv_scatter(src, layers, ids, spec)
            got["out"] = kv_gather(layers, ids, spec)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported below
            got["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in got, got.get("error")
    assert all(same_bits(a, b) for a, b in zip(layers, expected))
    assert same_bits(got["out"], oracle_gather(expected, ids, False))


def check_busy_slots(spec, device) -> None:
    """Driver path: every slot staged and held, one more call gets its own ids tensor, released
    slots are reused."""
    held = [
        block_ids_mod.stage_ids([k, k + 1], spec, device, unique=True)
        for k in range(id_staging.ID_SLOTS)
    ]
    assert all(s.stager is not None for s in held)
    extra = block_ids_mod.stage_ids([7, 9, 11], spec, device, unique=True)
    assert extra.stager is None and extra.tensor.tolist() == [7, 9, 11]
    for s in held:
        s.release()
    again = block_ids_mod.stage_ids([4, 2], spec, device, unique=False)
    assert again.stager is not None and again.tensor[: again.n].tolist() == [4, 2]
    again.release()


@gpu
@needs_cuda
def test_kv_public_path_busy_slots_and_misaligned_buffers_cuda(host_path):
    """Busy slots (driver path), and on both paths a buffer 2 bytes off 16-byte alignment,
    which gets its own kernel specialisation (compiled, then relaunched)."""
    layers, spec = make_cache(("flash", 500, 16, 2, 64), 3, torch.bfloat16, False, "cuda")
    if host_path == "driver":
        check_busy_slots(spec, layers[0].device)
    ids = random_ids(spec.num_blocks, 33, unique=False)
    shape = (len(ids), 3, spec.num_halves, spec.page_elems)
    numel = int(np.prod(shape))
    backing = poisoned((numel + 1,), torch.bfloat16, "cuda")
    out = backing[1:].view(shape)
    assert out.data_ptr() % 16 == 2
    for _ in range(2):  # the first call compiles the variant, the second relaunches it
        backing[1:].fill_(float("nan"))
        kv_gather(layers, ids, spec, out=out)
        assert same_bits(out, oracle_gather(layers, ids, False))


def test_kv_host_path_setting_is_checked(monkeypatch):
    assert id_staging.host_path() in id_staging.HOST_PATHS
    monkeypatch.setattr(id_staging, "HOST_PATH", "fast")
    with pytest.raises(ValueError, match=r"THAW_KV_HOST_PATH='fast' is not a KV host path"):
        id_staging.host_path()
