"""Plans of the KV gather/scatter launch: what a call derives once per layers set and per launch.

One engine calls kv_gather / kv_scatter many times with the same layers (vLLM's caches never
move) and new block ids. :func:`plan_for` checks a layers set once (shapes, extent, alignment,
base layer, the layers' offsets on the device) into a :class:`LayersPlan` and finds it again
cheaply: the last call's layers object by identity (~2 us), else an LRU keyed by the layers'
addresses (~8 us on the H200 host). Each plan keeps its :class:`LaunchPlan` per (spec,
direction, tile): the grid shape, the scalar arguments, the constexprs and the compiled kernels
(built by :mod:`.kv_blocks`, which owns the kernel).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .kv_pages import KVPageSpec, Layers, check_extent, checked_layers


def alignment(layers: list[torch.Tensor], spec: KVPageSpec) -> int:
    """Largest power-of-two element count (<= 16 bytes) dividing every offset and stride."""
    elem = layers[0].element_size()
    ptrs = [t.data_ptr() for t in layers]
    low = min(ptrs)
    deltas = [p - low for p in ptrs]
    if any(d % elem for d in deltas):
        raise ValueError(
            f"layer base addresses differ by a non-multiple of the element size {elem}: {deltas}"
        )
    align = max(1, 16 // elem)
    values = [spec.page_elems, spec.block_stride, spec.half_stride] + [d // elem for d in deltas]
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


@dataclass(slots=True, eq=False)
class LayersPlan:
    """Everything the launch derives from one layers set, checked and computed once.

    Valid while the caller passes the very tensors it was built from (``refs``, weak so a plan
    never keeps a cache alive) at the same addresses (the cache key). vLLM's cache tensors live
    as long as the engine; sleep mode unmaps and remaps them at the same addresses, which keeps
    the plan valid. Changing a layer tensor's shape in place (``resize_``, ``as_strided_``)
    without moving it, or re-pointing a layer other than the base in place (``set_``) when the
    caller passes the same list again, is not detected: pass new tensors instead.
    """

    refs: tuple[weakref.ref, ...]
    """The stacked tensor, or each layer of the list, as first seen."""
    base: int
    """Index of the lowest-addressed layer: the kernel's cache pointer."""
    base_ptr: int
    """That layer's address when the plan was built."""
    align: int
    """ALIGN of the kernel (elements per 16 bytes at most), see :func:`alignment`."""
    offs: torch.Tensor
    """int64 [n_layers] on the device: layer l starts offs[l]*align elements after the base."""
    n_layers: int
    device: torch.device
    device_index: int
    """``device``'s index (the current one when it names none), for raw stream lookups."""
    launches: dict = field(default_factory=dict)
    """(spec, to_buf, block, num_warps) -> :class:`LaunchPlan`, built on first use by kv_blocks."""

    def is_for(self, objs: Sequence[torch.Tensor]) -> bool:
        """Whether ``objs`` are the very tensors this plan was built from."""
        refs = self.refs
        return len(refs) == len(objs) and all(r() is o for r, o in zip(refs, objs))


# (spec, layer data_ptrs, layer 0's shape/stride/dtype/device) -> plan. Small LRU: one engine
# uses one layers set; tests and benchmarks make a few.
PLANS: OrderedDict[tuple, LayersPlan] = OrderedDict()
PLANS_MAX = 16
PLANS_LOCK = threading.Lock()


def plan_key(layers: Layers, spec: KVPageSpec) -> tuple[tuple, Sequence[torch.Tensor]] | None:
    """(cache key, tensors to check identity of), or None when ``layers`` needs the slow checks."""
    if isinstance(layers, torch.Tensor):
        return (
            spec,
            layers.data_ptr(),
            layers.shape,
            layers.stride(),
            layers.dtype,
            layers.device,
        ), (layers,)
    if not isinstance(layers, (list, tuple)) or not layers:
        return None
    try:
        ptrs = tuple([t.data_ptr() for t in layers])
    except (AttributeError, TypeError):
        return None  # not tensors: checked_layers raises the helpful error
    first = layers[0]
    return (spec, ptrs, first.shape, first.stride(), first.dtype, first.device), layers


def device_index_of(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def build_plan(layers: Layers, spec: KVPageSpec) -> LayersPlan:
    layer_list = checked_layers(layers)
    check_extent(layer_list, spec)
    align = alignment(layer_list, spec)
    ptrs = [t.data_ptr() for t in layer_list]
    base = min(range(len(ptrs)), key=ptrs.__getitem__)
    unit = align * layer_list[0].element_size()
    device = layer_list[0].device
    # A blocking copy, once per layers set: later calls may launch on other streams than this one.
    offs = torch.tensor([(p - ptrs[base]) // unit for p in ptrs], dtype=torch.int64).to(device)
    objs = (layers,) if isinstance(layers, torch.Tensor) else layer_list
    return LayersPlan(
        refs=tuple(weakref.ref(t) for t in objs),
        base=base,
        base_ptr=ptrs[base],
        align=align,
        offs=offs,
        n_layers=len(layer_list),
        device=device,
        device_index=device_index_of(device),
    )


# The last call's (id of its layers object, spec, plan): an engine passes the same layers list on
# every call, so most calls skip building the cache key (32 data_ptrs, hashing: ~5 us). An id can
# be reused by a new object once the old one died; plan.is_for then compares every tensor's
# identity, so a hit is always the very tensors the plan was built from.
LAST_PLAN: list[tuple[int, KVPageSpec, LayersPlan] | None] = [None]


def plan_for(layers: Layers, spec: KVPageSpec) -> tuple[LayersPlan, torch.Tensor]:
    """The cached plan for ``layers`` (built and validated on a miss) and the base layer tensor."""
    last = LAST_PLAN[0]
    if last is not None and last[0] == id(layers) and last[1] == spec:
        plan = last[2]
        if plan.is_for((layers,) if isinstance(layers, torch.Tensor) else layers):
            base = layers[plan.base]
            if base.data_ptr() == plan.base_ptr:
                return plan, base
    found = plan_key(layers, spec)
    remember = found is not None  # a list, tuple or tensor the caller may pass again
    if found is None:
        layers = checked_layers(layers)  # raises for empty / non-tensor input
        found = plan_key(layers, spec)
    key, objs = found
    with PLANS_LOCK:
        plan = PLANS.get(key)
        if plan is not None:
            PLANS.move_to_end(key)
    if plan is None or not plan.is_for(objs):
        plan = build_plan(layers, spec)
        with PLANS_LOCK:
            PLANS[key] = plan
            PLANS.move_to_end(key)
            while len(PLANS) > PLANS_MAX:
                PLANS.popitem(last=False)
    if remember:
        LAST_PLAN[0] = (id(layers), spec, plan)
    return plan, layers[plan.base]


@dataclass(slots=True, eq=False)
class LaunchPlan:
    """One (layers plan, spec, direction, tile) launch, derived once: what stays the same per call."""

    parts: int
    """Programs per page (grid axis 1)."""
    pages_per_block: int
    """Buffer pages per block id: n_layers * num_halves (grid axis 0 is n ids times this)."""
    scalars: tuple
    """The kernel's int arguments after the four pointers (n_layers, page/block/half units)."""
    consts: tuple
    """The constexprs, in signature order (NUM_HALVES, ALIGN, BLOCK, EVEN, TO_BUF)."""
    num_warps: int
    offs_ptr: int
    """Device address of the plan's layer offsets."""
    compiled: dict
    """(base, ids, buf address mod 16) -> Triton's CompiledKernel for that specialisation."""
