"""thaw_kernels: pure tensor ops (no vLLM import), each with a torch reference beside it.

Installed as ``thaw_kernels`` (the folder is ``triton_kernels/``): vLLM imports a module named
``triton_kernels`` (OpenAI's MoE kernels) and must never find this one.

One module per op, each holding the op's Triton kernel, its launcher, its torch reference and
its CPU path (tests: ``tests/unit/test_<op>.py``; benchmark: ``benchmarks/kernels.py``):

- :mod:`.kv_blocks`: gather/scatter KV-cache blocks of all layers in one launch.
- :mod:`.crc32c`: CRC32C per fixed-size chunk, and combining chunk CRCs.
- :mod:`.prefix_attention`: decode attention reading KV segments shared by many branches
  (a fan-out's prefix, forks of forks) once for all of them, then merging per branch
  (``shared_prefix_attention``; segments and their plan in :mod:`.prefix_segments`).

and what the KV op builds on:

- :mod:`.block_ids`: block ids validated on the host, then staged to the device by
- :mod:`.id_staging`: reusable pinned slots, through torch (default) or driver calls, which are
- :mod:`.cuda_driver`: the few CUDA driver calls (memcpy, events) through ctypes.
- :mod:`.kv_pages`: where a layer tensor's pages are (``KVPageSpec``), layer/buffer checks.
- :mod:`.kv_plans`: what a launch derives once per layers set (``LayersPlan``) and per launch.

Imports point down only: kv_blocks -> block_ids -> id_staging -> cuda_driver, block_ids ->
kv_pages (and kv_blocks -> kv_plans -> kv_pages; kv_blocks -> id_staging, cuda_driver);
prefix_attention -> prefix_segments; crc32c, kv_pages and prefix_segments import no sibling.

CUDA tensors run Triton kernels; CPU tensors run the torch/libcrc32c paths.
"""

from .crc32c import chunk_crc32c, chunk_crc32c_reference, combine_chunk_crcs, crc32c_combine
from .kv_blocks import kv_gather, kv_gather_reference, kv_scatter, kv_scatter_reference
from .kv_pages import KVPageSpec, page_spec_for
from .prefix_attention import (
    Segment,
    SegmentPlan,
    plan_segments,
    shared_prefix_attention,
    shared_prefix_attention_reference,
)

__all__ = [
    "KVPageSpec",
    "page_spec_for",
    "kv_gather",
    "kv_scatter",
    "kv_gather_reference",
    "kv_scatter_reference",
    "chunk_crc32c",
    "chunk_crc32c_reference",
    "crc32c_combine",
    "combine_chunk_crcs",
    "Segment",
    "SegmentPlan",
    "plan_segments",
    "shared_prefix_attention",
    "shared_prefix_attention_reference",
]
