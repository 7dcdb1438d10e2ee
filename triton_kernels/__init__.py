"""thaw_kernels: pure tensor ops (no vLLM import), each with a torch reference beside it.

Installed as ``thaw_kernels`` (the folder is ``triton_kernels/``): vLLM imports a module named
``triton_kernels`` (OpenAI's MoE kernels) and must never find this one.

- :mod:`.kv_blocks`: gather/scatter KV-cache blocks of all layers in one launch.
- :mod:`.crc32c`: CRC32C per fixed-size chunk, and combining chunk CRCs.

CUDA tensors run Triton kernels; CPU tensors run the torch/libcrc32c paths.
"""

from .crc32c import chunk_crc32c, chunk_crc32c_reference, combine_chunk_crcs, crc32c_combine
from .kv_blocks import (
                        KVPageSpec,
                        kv_gather,
                        kv_gather_reference,
                        kv_scatter,
                        kv_scatter_reference,
                        page_spec_for,
)

__all__ = [
    "KVPageSpec", "page_spec_for", "kv_gather", "kv_scatter", "kv_gather_reference", "kv_scatter_reference",
    "chunk_crc32c", "chunk_crc32c_reference", "crc32c_combine", "combine_chunk_crcs",
]
