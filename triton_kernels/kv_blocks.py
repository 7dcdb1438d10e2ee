"""Gather / scatter KV-cache blocks of every layer in one launch.

A *page* is what one block holds in one half (K or V) of one layer; :mod:`.kv_pages` draws the
two layer layouts (flash, cpu) and derives their :class:`~.kv_pages.KVPageSpec`. The snapshot
buffer is **block-major**, so a reader that needs only the first k blocks reads a contiguous
prefix::

    buf[i, l, h, :] = page(layer l, half h, block block_ids[i])     shape [n, n_layers, halves, page]

    | blk0: L0.K L0.V L1.K L1.V ... | blk1: L0.K L0.V ... | ... |

Layers come as a list of same-shaped tensors (each may be its own allocation, as vLLM allocates
them on GPU) or as one tensor with a leading layer dimension. CUDA tensors go through one Triton
launch over all (block, layer, half, slice) tiles. CPU tensors (the product's CPU path) go through
torch: a single strided index_select when all layers share one buffer (vLLM's CPU backend), else
the per-layer reference. Copies move raw bits (integer views), so NaN payloads survive.

In this module, in order: the torch references (``kv_gather_reference`` / ``kv_scatter_reference``),
the Triton kernel (``_kv_pages_kernel``) and its launcher (``_kv_gather_triton`` /
``_kv_scatter_triton``, with the cached layers plan), the CPU path (``_kv_gather_cpu`` /
``_kv_scatter_cpu``) and the public dispatch (``kv_gather`` / ``kv_scatter``).

Per-call host cost (CUDA). One engine calls gather/scatter many times with the same layers (vLLM's
caches never move) and new block ids, so a call does only::

    layers  --same object as last call + identity--> cached LayersPlan (checked once: shapes,
                                      extent, alignment, base layer, device offsets)
    ids     --numpy min/max/set--> validated on the host (no device sync)
    ids     --> reusable pinned slot --async H2D--> device ids (block_ids.stage_ids)
    out     --check_buffer
    one launch of the already compiled kernel (_launch: CompiledKernel[grid], LaunchPlan)

benchmarks/kv_host_cost.py times each step (results/kv_host_cost_<gpu>.json). History of one
public call's host time at 136 MB: 131 / 168 us (gather / scatter, H100) with JITFunction.run for
every launch; 90 / 116 us with the compiled-kernel relaunch. On the H200 that still leaves
back-to-back calls host-bound (0.54 / 0.51 of a device copy for a ~70 us kernel): the "driver"
host path (id_staging.py: driver-call staging, raw-address relaunch) is written to take ~40 us
more off and waits for its first GPU run before it becomes the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import id_staging
from .block_ids import BlockIds, block_id_tensor, stage_ids
from .cuda_driver import current_stream
from .kv_pages import RAW_DTYPES, KVPageSpec, Layers, check_buffer, check_extent, checked_layers
from .kv_plans import LaunchPlan, LayersPlan, plan_for

# Tile defaults (bytes per program, capped at one page; warps). H100, triton 3.6, 1.07 GB gather of
# Llama-8B pages (32 KiB): 32 KiB x 4 warps 0.745 ms (0.961 of a D2D copy) vs 8 KiB x 4 warps
# 0.760 ms; 4-32 KiB x 4/8 warps all within 2.5%. 32 KiB x 4 warps is 16 LDG.128 in flight per
# thread, 78 registers (6 programs/SM): ~190 KiB in flight per SM, far over the ~25 KiB that
# 3.35 TB/s needs. The 136 MB numbers of that run were host-bound (see the module docstring).
# Run 2 (benchmarks/results/kernels_nvidia-h100-80gb-hbm3.json): 32 KiB x 8 warps was the best
# variant for both ops at both sizes (gather 0.941 / 0.962 of D2D at 136 MB / 1.07 GB, scatter
# 0.934 / 0.955), while the 4-warp default's scatter came out at 0.635 at 136 MB: 8 warps since.
DEFAULT_BLOCK_BYTES = 32768
DEFAULT_NUM_WARPS = 8


# ---------------------------------------------------------------------------------------------
# Torch references (and the CPU path).


def _prepare(layers: Layers, block_ids: BlockIds, spec: KVPageSpec, unique: bool):
    """(checked layer list, validated int64 ids on the layers' device, buffer shape)."""
    layer_list = checked_layers(layers)
    check_extent(layer_list, spec)
    ids = block_id_tensor(block_ids, spec, layer_list[0].device, unique)
    shape = (ids.numel(), len(layer_list), spec.num_halves, spec.page_elems)
    return layer_list, ids, shape


def _raw_pages(layer: torch.Tensor, spec: KVPageSpec) -> torch.Tensor:
    """[num_halves, num_blocks, page_elems] raw-integer view aliasing the layer's pages."""
    raw = layer.view(RAW_DTYPES[layer.element_size()])
    return raw.as_strided(
        (spec.num_halves, spec.num_blocks, spec.page_elems),
        (spec.half_stride, spec.block_stride, 1),
        raw.storage_offset(),
    )


def kv_gather_reference(
    layers: Layers, block_ids: BlockIds, spec: KVPageSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-layer index_select; returns ``[n_blocks, n_layers, num_halves, page_elems]``."""
    layer_list, ids, shape = _prepare(layers, block_ids, spec, unique=False)
    out = (
        torch.empty(shape, dtype=layer_list[0].dtype, device=ids.device)
        if out is None
        else check_buffer(out, "out", layer_list[0], shape)
    )
    raw_out = out.view(RAW_DTYPES[out.element_size()])
    for li, layer in enumerate(layer_list):
        raw_out[:, li] = _raw_pages(layer, spec).index_select(1, ids).transpose(0, 1)
    return out


def kv_scatter_reference(
    src: torch.Tensor, layers: Layers, block_ids: BlockIds, spec: KVPageSpec
) -> None:
    """Per-layer index_copy_ of ``src`` ([n_blocks, n_layers, num_halves, page_elems]) into the cache."""
    layer_list, ids, shape = _prepare(layers, block_ids, spec, unique=True)
    raw_src = check_buffer(src, "src", layer_list[0], shape).view(RAW_DTYPES[src.element_size()])
    for li, layer in enumerate(layer_list):
        _raw_pages(layer, spec).index_copy_(1, ids, raw_src[:, li].transpose(0, 1))


# ---------------------------------------------------------------------------------------------
# Triton path: one launch, grid = (pages in the buffer, slices of a page).


@triton.jit
def _kv_pages_kernel(
    cache_ptr,
    layer_offs_ptr,
    block_ids_ptr,
    buf_ptr,
    n_layers,
    page_units,
    block_units,
    half_units,
    NUM_HALVES: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
    EVEN: tl.constexpr,
    TO_BUF: tl.constexpr,
):
    # cache_ptr is the lowest-addressed layer; layer l starts layer_offs[l]*ALIGN elements after it.
    # Offsets and strides arrive in units of ALIGN elements (ALIGN*elem = up to 16 bytes) and are
    # multiplied by the constexpr here, so the compiler can prove 16-byte alignment and emit
    # 128-bit loads/stores even though the layer base is loaded from memory.
    page = tl.program_id(0)  # buffer page, block-major: ((i * n_layers) + l) * NUM_HALVES + h
    part = tl.program_id(1)
    half = page % NUM_HALVES
    rest = page // NUM_HALVES
    layer = rest % n_layers
    i = rest // n_layers
    blk = tl.load(block_ids_ptr + i).to(tl.int64)
    src_units = tl.load(layer_offs_ptr + layer) + half.to(tl.int64) * half_units + blk * block_units
    page_elems = page_units * ALIGN
    offs = part * BLOCK + tl.arange(0, BLOCK)
    cache_p = cache_ptr + src_units * ALIGN + offs
    buf_p = buf_ptr + page.to(tl.int64) * page_elems + offs
    if EVEN:
        if TO_BUF:
            tl.store(buf_p, tl.load(cache_p))
        else:
            tl.store(cache_p, tl.load(buf_p))
    else:
        mask = offs < page_elems
        if TO_BUF:
            tl.store(buf_p, tl.load(cache_p, mask=mask), mask=mask)
        else:
            tl.store(cache_p, tl.load(buf_p, mask=mask), mask=mask)


def _launch_plan(
    plan: LayersPlan, elem: int, spec: KVPageSpec, to_buf: bool, block: int | None, num_warps: int
) -> LaunchPlan:
    """The layers plan's launch for this spec, direction and tile (built on first use)."""
    key = (spec, to_buf, block, num_warps)
    found = plan.launches.get(key)
    if found is not None:
        return found
    if block is None:
        block = DEFAULT_BLOCK_BYTES // elem
    block = min(block, triton.next_power_of_2(spec.page_elems))
    align = plan.align
    found = LaunchPlan(
        parts=triton.cdiv(spec.page_elems, block),
        pages_per_block=plan.n_layers * spec.num_halves,
        scalars=(
            plan.n_layers,
            spec.page_elems // align,
            spec.block_stride // align,
            spec.half_stride // align,
        ),
        consts=(spec.num_halves, align, block, spec.page_elems % block == 0, to_buf),
        num_warps=num_warps,
        offs_ptr=plan.offs.data_ptr(),
        compiled={},
    )
    return plan.launches.setdefault(key, found)


def _launch(
    plan: LayersPlan,
    base: torch.Tensor,
    ids: torch.Tensor,
    n: int,
    buf: torch.Tensor,
    spec: KVPageSpec,
    to_buf: bool,
    block: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> None:
    """Queue the kernel over ``n`` ids (the first ``n`` of ``ids``) on the current stream.

    The first launch of a specialisation goes through JITFunction (compiles, checks arguments);
    later ones relaunch its CompiledKernel (no argument binding, no cache lookup): with tensors,
    or on the "driver" host path (id_staging.py) with raw addresses and a raw stream (no tensor
    views, no pointer queries).
    """
    if n == 0:
        return
    launch = _launch_plan(plan, base.element_size(), spec, to_buf, block, num_warps)
    ptrs = (base.data_ptr(), ids.data_ptr(), buf.data_ptr())
    grid = (n * launch.pages_per_block, launch.parts, 1)
    align_key = (ptrs[0] % 16, ptrs[1] % 16, ptrs[2] % 16)
    compiled = launch.compiled.get(align_key)
    if compiled is not None:
        if id_staging.HOST_PATH == "driver":
            compiled[grid](
                ptrs[0],
                launch.offs_ptr,
                ptrs[1],
                ptrs[2],
                *launch.scalars,
                *launch.consts,
                stream=current_stream(plan.device_index),
            )
        else:
            raw = RAW_DTYPES[base.element_size()]
            compiled[grid](
                base.view(raw),
                plan.offs,
                ids,
                buf.view(raw),
                *launch.scalars,
                *launch.consts,
                stream=torch.cuda.current_stream(base.device).cuda_stream,
            )
        return
    raw = RAW_DTYPES[base.element_size()]
    consts = launch.consts
    compiled = _kv_pages_kernel[grid](
        base.view(raw),
        plan.offs,
        ids,
        buf.view(raw),
        *launch.scalars,
        NUM_HALVES=consts[0],
        ALIGN=consts[1],
        BLOCK=consts[2],
        EVEN=consts[3],
        TO_BUF=consts[4],
        num_warps=launch.num_warps,
    )
    if base.is_cuda and hasattr(compiled, "packed_metadata"):  # not under the interpreter
        launch.compiled[align_key] = compiled


def _kv_gather_triton(
    layers: Layers, block_ids: BlockIds, spec: KVPageSpec, out: torch.Tensor | None = None, **tile
) -> torch.Tensor:
    plan, base = plan_for(layers, spec)
    ids = stage_ids(block_ids, spec, plan.device, unique=False)
    try:
        shape = (ids.n, plan.n_layers, spec.num_halves, spec.page_elems)
        out = (
            torch.empty(shape, dtype=base.dtype, device=plan.device)
            if out is None
            else check_buffer(out, "out", base, shape)
        )
        _launch(plan, base, ids.tensor, ids.n, out, spec, to_buf=True, **tile)
    finally:
        ids.release()
    return out


def _kv_scatter_triton(
    src: torch.Tensor, layers: Layers, block_ids: BlockIds, spec: KVPageSpec, **tile
) -> None:
    plan, base = plan_for(layers, spec)
    ids = stage_ids(block_ids, spec, plan.device, unique=True)
    try:
        src = check_buffer(
            src, "src", base, (ids.n, plan.n_layers, spec.num_halves, spec.page_elems)
        )
        _launch(plan, base, ids.tensor, ids.n, src, spec, to_buf=False, **tile)
    finally:
        ids.release()


# ---------------------------------------------------------------------------------------------
# CPU path: when all layers sit in one buffer at a uniform stride (vLLM's CPU backend), one strided
# view [num_blocks, n_layers, num_halves, page_elems] makes the whole gather a single
# index_select (3.6x the per-layer reference: 0.97 vs 3.5 ms for 23 MB, 30 layers, 2-core host).


def _stacked_pages(layers: list[torch.Tensor], spec: KVPageSpec) -> torch.Tensor | None:
    """Raw view [num_blocks, n_layers, num_halves, page_elems] over all layers, or None."""
    first = layers[0]
    ptrs = [t.data_ptr() for t in layers]
    elem = first.element_size()
    if any(t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in layers):
        return None
    step = (ptrs[1] - ptrs[0]) if len(ptrs) > 1 else spec.extent_elems * elem
    if (
        step % elem
        or step // elem < spec.extent_elems
        or any(b - a != step for a, b in zip(ptrs, ptrs[1:]))
    ):
        return None  # interleaved or irregular layers: the reference handles them
    raw = first.view(RAW_DTYPES[elem])
    return raw.as_strided(
        (spec.num_blocks, len(layers), spec.num_halves, spec.page_elems),
        (spec.block_stride, step // elem, spec.half_stride, 1),
        raw.storage_offset(),
    )


def _kv_gather_cpu(
    layers: Layers, block_ids: BlockIds, spec: KVPageSpec, out: torch.Tensor | None
) -> torch.Tensor:
    layer_list, ids, shape = _prepare(layers, block_ids, spec, unique=False)
    pages = _stacked_pages(layer_list, spec)
    if pages is None:
        return kv_gather_reference(layer_list, ids, spec, out)
    out = (
        torch.empty(shape, dtype=layer_list[0].dtype)
        if out is None
        else check_buffer(out, "out", layer_list[0], shape)
    )
    torch.index_select(pages, 0, ids, out=out.view(pages.dtype))
    return out


def _kv_scatter_cpu(
    src: torch.Tensor, layers: Layers, block_ids: BlockIds, spec: KVPageSpec
) -> None:
    layer_list, ids, shape = _prepare(layers, block_ids, spec, unique=True)
    pages = _stacked_pages(layer_list, spec)
    if pages is None:
        kv_scatter_reference(src, layer_list, ids, spec)
    else:
        pages.index_copy_(0, ids, check_buffer(src, "src", layer_list[0], shape).view(pages.dtype))


# ---------------------------------------------------------------------------------------------
# Public dispatch.


def _device_of(layers: Layers) -> torch.device:
    if isinstance(layers, torch.Tensor):
        return layers.device
    first = layers[0] if isinstance(layers, (list, tuple)) and layers else None
    return first.device if isinstance(first, torch.Tensor) else checked_layers(layers)[0].device


def kv_gather(
    layers: Layers, block_ids: BlockIds, spec: KVPageSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the pages of ``block_ids`` from every layer into one block-major buffer.

    Returns ``out`` viewed as ``[len(block_ids), n_layers, spec.num_halves, spec.page_elems]`` in
    the layers' dtype. Block ids may repeat. CUDA: one Triton launch; CPU: torch index_select
    (one call when the layers share a buffer, else one per layer).
    """
    if _device_of(layers).type == "cuda":
        return _kv_gather_triton(layers, block_ids, spec, out)
    return _kv_gather_cpu(layers, block_ids, spec, out)


def kv_scatter(src: torch.Tensor, layers: Layers, block_ids: BlockIds, spec: KVPageSpec) -> None:
    """Inverse of :func:`kv_gather`: write ``src`` pages into the cache in place (ids must be unique)."""
    if _device_of(layers).type == "cuda":
        _kv_scatter_triton(src, layers, block_ids, spec)
    else:
        _kv_scatter_cpu(src, layers, block_ids, spec)
