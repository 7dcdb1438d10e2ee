"""The namespace a KV snapshot belongs to: only an engine with the same namespace may load it.

KV pages are opaque bytes, valid only for the same weights, dtype, KV-cache dtype, attention
layout and block size (vLLM's block hashes cover tokens only, not the model). The namespace
pins all of these; ``Namespace.key()`` names the store folder and ``Namespace.mismatches``
says which field differs when a snapshot is refused.

Model fingerprint: sha256 over config.json and, for every weight file, its name, size, header
(safetensors) and first and last MiB. Cheap (no full read of GBs) and it changes when the
weights change in practice; for certainty across in-place weight updates (RL), pass a
``weights_version`` (e.g. the training step) and bump it with every update.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from thaw_agents_core.snapshot.block_hashes import HASH_ALGO
from thaw_agents_core.snapshot.format import Namespace
from thaw_agents_core.util import compat

_EDGE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _file_digest(path: Path, digest: hashlib._Hash) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}\0".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        if size > 2 * _EDGE_BYTES:
            handle.seek(size - _EDGE_BYTES)
            digest.update(handle.read(_EDGE_BYTES))


def model_fingerprint(model_config: Any, load_format: str | None = None) -> str:
    """A short hex fingerprint of the model's config and weights (see module docstring)."""
    digest = hashlib.sha256()
    folder = Path(str(model_config.model))
    if folder.is_dir():
        config = folder / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        if load_format == "dummy":
            digest.update(b"dummy-weights")
        else:
            for path in sorted(folder.iterdir()):
                if path.suffix in _WEIGHT_SUFFIXES and path.is_file():
                    _file_digest(path, digest)
    else:  # a hub id: the id, revision and the config vLLM resolved
        digest.update(f"{model_config.model}@{getattr(model_config, 'revision', None)}".encode())
        digest.update(model_config.hf_config.to_json_string().encode())
        if load_format == "dummy":
            digest.update(b"dummy-weights")
    return digest.hexdigest()[:32]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def namespace_for(vllm_config: Any, weights_version: str = "") -> Namespace:
    """The namespace of an engine, from its ``VllmConfig`` alone (frontend or engine core)."""
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    parallel_config = vllm_config.parallel_config
    load_format = str(getattr(vllm_config.load_config, "load_format", "auto"))
    dtype = _dtype_name(model_config.dtype)
    cache_dtype = str(cache_config.cache_dtype)
    kv_cache_dtype = dtype if cache_dtype == "auto" else cache_dtype
    block_size = int(cache_config.block_size)
    return Namespace(
        model_fingerprint=_cached_fingerprint(model_config, load_format),
        weights_version=str(weights_version),
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        layout=compat.kv_layout_name(),
        block_size=block_size,
        num_layers=int(model_config.get_num_layers(parallel_config)),
        page_shape=(
            block_size,
            int(model_config.get_num_kv_heads(parallel_config)),
            int(model_config.get_head_size()),
        ),
        vllm_version=compat.vllm_version(),
        hash_algo=HASH_ALGO,
    )


_fingerprints: dict[tuple[str, str, float], str] = {}


def _cached_fingerprint(model_config: Any, load_format: str) -> str:
    path = str(model_config.model)
    mtime = os.stat(path).st_mtime if os.path.exists(path) else 0.0
    key = (path, load_format, mtime)
    if key not in _fingerprints:
        _fingerprints[key] = model_fingerprint(model_config, load_format)
    return _fingerprints[key]
