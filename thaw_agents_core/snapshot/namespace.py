"""The namespace a KV snapshot belongs to: only an engine with the same namespace may load it.

KV pages are opaque bytes, valid only for the same weights, dtype, KV-cache dtype, attention
layout and block size (vLLM's block hashes cover tokens only, not the model). The namespace
pins all of these; ``Namespace.key()`` names the store folder and ``Namespace.mismatches``
says which field differs when a snapshot is refused.

Tensor parallelism: each rank holds its own KV heads, so each rank's snapshot of a prefix has
its own namespace (``tensor_rank`` "r/n"; empty, and absent from the JSON, for one rank). The
scheduler looks up rank 0's and offers a prefix only when every rank has its shard.

Model fingerprint: sha256 over config.json and, for every weight file, its name, size, header
(safetensors) and first and last MiB. Cheap (no full read of GBs) and it changes when the
weights change in practice; for certainty across in-place weight updates (RL), pass a
``weights_version`` (e.g. the training step) and bump it with every update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thaw_agents_core.snapshot.block_hashes import HASH_ALGO
from thaw_agents_core.snapshot.errors import SnapshotFormatError
from thaw_agents_core.snapshot.framing import is_int, short
from thaw_agents_core.util import compat


@dataclass(frozen=True, slots=True)
class Namespace:
    """What must be equal for KV bytes to be reusable. ``key()`` names its store directory."""

    model_fingerprint: str
    weights_version: str
    dtype: str
    kv_cache_dtype: str
    layout: str  # attention backend's page layout: "cpu", "flash", ...
    block_size: int
    num_layers: int
    page_shape: tuple[int, ...]  # one layer's page of one block (opaque, compared only)
    vllm_version: str
    hash_algo: str = HASH_ALGO
    tensor_rank: str = ""
    """"r/n": rank r of n tensor-parallel ranks (each holds its own KV heads: every rank has its
    own snapshot of a prefix); "" for one rank (then absent from the JSON, so single-rank keys
    are what they were before ranks existed)."""
    _key: str = field(default="", init=False, repr=False, compare=False)  # cached key()

    def __post_init__(self) -> None:
        shape = self.page_shape
        if not (isinstance(shape, (list, tuple)) and all(is_int(d) and d >= 0 for d in shape)):
            raise ValueError(
                f"namespace field 'page_shape' must be a list of non-negative ints, got {short(shape)}"
            )
        object.__setattr__(self, "page_shape", tuple(shape))
        for name in _NS_FIELDS:
            v = getattr(self, name)
            if name in ("block_size", "num_layers"):
                if not is_int(v) or v <= 0:
                    raise ValueError(
                        f"namespace field {name!r} must be a positive int, got {short(v)}"
                    )
            elif name != "page_shape" and not isinstance(v, str):
                raise ValueError(f"namespace field {name!r} must be a string, got {short(v)}")
        if self.tensor_rank and not _is_rank(self.tensor_rank):
            raise ValueError(
                f"namespace field 'tensor_rank' must be \"r/n\" with 0 <= r < n, 2 <= n <= 4096, "
                f"or empty, got {short(self.tensor_rank)}"
            )
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_key", hashlib.sha256(canon.encode()).hexdigest()[:32])

    def to_json(self) -> dict[str, Any]:
        """The header's ``namespace`` object (``page_shape`` as a list)."""
        d = {name: getattr(self, name) for name in _NS_FIELDS}
        d["page_shape"] = list(self.page_shape)
        if not self.tensor_rank:
            del d["tensor_rank"]
        return d

    @classmethod
    def from_json(cls, obj: Any) -> Namespace:
        """Parse a header's ``namespace`` object (SnapshotFormatError unless exact)."""
        if not isinstance(obj, Mapping):
            raise SnapshotFormatError(
                f"header field 'namespace' must be an object, got {short(obj)}"
            )
        missing = [n for n in _NS_FIELDS if n not in obj and n not in _OPTIONAL]
        unknown = sorted(set(obj) - set(_NS_FIELDS))
        if missing or unknown:
            raise SnapshotFormatError(
                f"namespace fields do not match: missing {missing}, unknown {unknown}"
            )
        try:
            return cls(**{n: obj[n] for n in _NS_FIELDS if n in obj})
        except ValueError as e:
            raise SnapshotFormatError(str(e)) from None

    def key(self) -> str:
        """32 hex chars of sha256 over the canonical JSON; stable across processes and hosts."""
        return self._key

    @property
    def tensor_size(self) -> int:
        """Tensor-parallel ranks of the engine this namespace belongs to (1 without a rank)."""
        return int(self.tensor_rank.split("/")[1]) if self.tensor_rank else 1

    def for_rank(self, rank: int) -> Namespace:
        """The same namespace for tensor-parallel rank ``rank`` (its own KV heads)."""
        return dataclasses.replace(self, tensor_rank=tensor_rank_of(rank, self.tensor_size))

    def mismatches(self, other: Namespace) -> list[str]:
        """One line per differing field; ``self`` is the snapshot's, ``other`` the engine's."""
        out = []
        for name in _NS_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: snapshot has {a!r}, this engine has {b!r}")
        return out


_NS_FIELDS = tuple(f.name for f in dataclasses.fields(Namespace) if f.init)
_OPTIONAL = ("tensor_rank",)


def _is_rank(value: str) -> bool:
    parts = value.split("/")
    if len(parts) != 2 or not all(p.isdigit() and p.isascii() and len(p) <= 4 for p in parts):
        return False
    rank, size = (int(p) for p in parts)
    return 0 <= rank < size and 2 <= size <= 4096 and value == f"{rank}/{size}"


def tensor_rank_of(rank: int, size: int) -> str:
    """The ``tensor_rank`` field of rank ``rank`` of ``size`` ("" for one rank)."""
    return f"{rank}/{size}" if size > 1 else ""


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


def tensor_parallel_size(vllm_config: Any) -> int:
    """The engine's tensor-parallel size (1 without parallelism)."""
    return int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)


def local_tensor_rank(vllm_config: Any) -> int:
    """This worker's tensor-parallel rank (0 with one rank; needs vLLM's groups otherwise)."""
    if tensor_parallel_size(vllm_config) == 1:
        return 0
    from vllm.distributed import parallel_state

    return int(parallel_state.get_tensor_model_parallel_rank())


def namespace_for(vllm_config: Any, weights_version: str = "", rank: int = 0) -> Namespace:
    """The namespace of an engine's tensor-parallel rank ``rank``, from its ``VllmConfig``
    alone (frontend, engine core or worker)."""
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
        tensor_rank=tensor_rank_of(rank, tensor_parallel_size(vllm_config)),
    )


_fingerprints: dict[tuple[str, str, float], str] = {}


def _cached_fingerprint(model_config: Any, load_format: str) -> str:
    path = str(model_config.model)
    mtime = os.stat(path).st_mtime if os.path.exists(path) else 0.0
    key = (path, load_format, mtime)
    if key not in _fingerprints:
        _fingerprints[key] = model_fingerprint(model_config, load_format)
    return _fingerprints[key]
