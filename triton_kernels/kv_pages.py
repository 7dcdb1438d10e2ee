"""Where the pages of a KV-cache layer tensor are (:class:`KVPageSpec`), and the checks of layers
and buffers against a spec that every gather/scatter path runs before it copies a byte.

vLLM keeps one KV tensor per attention layer. A *page* is the contiguous run of elements that one
block holds in one half (K or V) of one layer. Two layouts are supported::

    flash (GPU FlashAttention), per layer [2, num_blocks, block_size, kv_heads, head_dim]

        half 0 (K) | page b0 | page b1 | page b2 | ... |      page = block_size*kv_heads*head_dim
        half 1 (V) | page b0 | page b1 | page b2 | ... |      num_halves = 2
                   ^-- half_stride = num_blocks*page_elems --^

    cpu (vLLM CPU backend), per layer [num_blocks, kv_heads, block_size, 2*head_dim]

        | page b0 | page b1 | page b2 | ...                  page = kv_heads*block_size*2*head_dim
                                                             num_halves = 1

Used by :mod:`.block_ids` (id ranges) and :mod:`.kv_blocks` (the copies); imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Literal, Sequence, Union

import torch

Layers = Union[Sequence[torch.Tensor], torch.Tensor]
"""A list of same-shaped layer tensors, or one tensor with a leading layer dimension."""

RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Raw-bit view per element size: copies never go through float registers."""


@dataclass(frozen=True, slots=True)
class KVPageSpec:
    """Where the pages of one layer tensor are, in elements of its dtype.

    page(half h, block b) = layer.flatten-storage[offset + h*half_stride + b*block_stride :][:page_elems]
    ``half_stride`` is 0 when ``num_halves == 1``.
    """

    num_halves: int
    page_elems: int
    block_stride: int
    half_stride: int
    num_blocks: int
    """Blocks in the cache (valid block ids are 0..num_blocks-1)."""

    def __post_init__(self) -> None:
        if self.num_halves not in (1, 2):
            raise ValueError(f"num_halves must be 1 or 2, got {self.num_halves}")
        if self.page_elems < 1 or self.num_blocks < 1:
            raise ValueError(
                f"page_elems ({self.page_elems}) and num_blocks ({self.num_blocks}) must be >= 1"
            )
        if self.num_blocks > 1 and self.block_stride < self.page_elems:
            raise ValueError(
                f"block_stride {self.block_stride} < page_elems {self.page_elems}: pages overlap"
            )
        if self.num_halves == 2:
            p, bs, hs = self.page_elems, self.block_stride, self.half_stride
            separate = hs >= (self.num_blocks - 1) * bs + p  # [2, blocks, ...]: K half, then V half
            interleaved = p <= hs <= bs - p  # [blocks, 2, ...] viewed as [2, blocks, ...]
            if not (separate or interleaved):
                raise ValueError(
                    f"half_stride {hs} makes K and V pages overlap (page {p}, block_stride {bs})"
                )

    @property
    def extent_elems(self) -> int:
        """Elements spanned from a layer's first element to the end of its last page."""
        return (
            (self.num_blocks - 1) * self.block_stride
            + (self.num_halves - 1) * self.half_stride
            + self.page_elems
        )


def _is_contiguous_tail(t: torch.Tensor, first_dim: int) -> bool:
    expected = 1
    for d in range(t.ndim - 1, first_dim - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def page_spec_for(tensor: torch.Tensor, layout: Literal["flash", "cpu"]) -> KVPageSpec:
    """Derive the page spec of ONE layer tensor (not the stacked [layers, ...] form)."""
    if layout == "flash":
        if tensor.ndim != 5 or tensor.shape[0] != 2:
            raise ValueError(
                f"flash layout wants [2, num_blocks, block_size, kv_heads, head_dim], got {tuple(tensor.shape)}"
            )
        first, num_halves, block_dim = 2, 2, 1
        half_stride = tensor.stride(0)
    elif layout == "cpu":
        if tensor.ndim != 4:
            raise ValueError(
                f"cpu layout wants [num_blocks, kv_heads, block_size, 2*head_dim], got {tuple(tensor.shape)}"
            )
        first, num_halves, block_dim, half_stride = 1, 1, 0, 0
    else:
        raise ValueError(f"layout must be 'flash' or 'cpu', got {layout!r}")
    if not _is_contiguous_tail(tensor, first):
        raise ValueError(
            f"{layout} layout: a page (dims {first}.. of shape {tuple(tensor.shape)}) must be contiguous, "
            f"but strides are {tensor.stride()}; pass the cache tensor vLLM allocated, not a permuted view"
        )
    return KVPageSpec(
        num_halves=num_halves,
        page_elems=prod(tensor.shape[first:]),
        block_stride=tensor.stride(block_dim),
        half_stride=half_stride,
        num_blocks=tensor.shape[block_dim],
    )


# ---------------------------------------------------------------------------------------------
# Checks shared by the references, the CPU path and the Triton path.


def checked_layers(layers: Layers) -> list[torch.Tensor]:
    """``layers`` as a list, checked: not empty, all tensors of one dtype/shape/stride/device."""
    if isinstance(layers, torch.Tensor):
        if layers.ndim < 2:
            raise ValueError(
                f"a stacked layers tensor needs a leading layer dim, got shape {tuple(layers.shape)}"
            )
        out = list(layers.unbind(0))
    else:
        out = list(layers)
    if not out:
        raise ValueError("layers is empty")
    first = out[0]
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layers[{i}] is {type(t).__name__}, expected a torch.Tensor")
        if (
            t.dtype != first.dtype
            or t.shape != first.shape
            or t.stride() != first.stride()
            or t.device != first.device
        ):
            raise ValueError(
                f"layers[{i}] is {t.dtype} {tuple(t.shape)} stride {t.stride()} on {t.device}, but layers[0] is "
                f"{first.dtype} {tuple(first.shape)} stride {first.stride()} on {first.device}; all must match"
            )
    if first.element_size() not in RAW_DTYPES:
        raise ValueError(f"unsupported dtype {first.dtype} (element size {first.element_size()})")
    return out


def check_extent(layers: list[torch.Tensor], spec: KVPageSpec) -> None:
    """Raise unless every layer's storage holds all pages ``spec`` addresses."""
    # The kernel addresses raw memory, so a spec larger than the tensor would read/write out of bounds.
    for i, layer in enumerate(layers):
        storage_elems = layer.untyped_storage().nbytes() // layer.element_size()
        end = layer.storage_offset() + spec.extent_elems
        if end > storage_elems:
            raise ValueError(
                f"spec spans {spec.extent_elems} elements from layers[{i}] (offset "
                f"{layer.storage_offset()}) but its storage holds {storage_elems}"
            )


def check_buffer(
    buf: torch.Tensor, name: str, like: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """``buf`` viewed as ``shape``, checked: ``like``'s dtype and device, contiguous, the right size."""
    if buf.dtype != like.dtype or buf.device != like.device:
        raise ValueError(
            f"{name} is {buf.dtype} on {buf.device}, expected {like.dtype} on {like.device}"
        )
    if buf.numel() != prod(shape):
        raise ValueError(
            f"{name} has {buf.numel()} elements, expected {prod(shape)} = {list(shape)} "
            "(blocks, layers, halves, page_elems)"
        )
    if not buf.is_contiguous():
        raise ValueError(f"{name} must be contiguous (stride {buf.stride()})")
    return buf.view(shape)
