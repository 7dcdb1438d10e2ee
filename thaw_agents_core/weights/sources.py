"""Where new weights come from, as a JSON descriptor that crosses to the engine's workers.

    describe(src)              caller side   -> ({"kind": ...}, cleanup)
      "x.thaw" / Path / s3://    {"kind": "file", "path"}        (s3: fetched to the local cache;
                                                                  per-rank name resolved by the worker)
      WeightsBuffer              {"kind": "shm", "name", "size"}  registered once per worker, reused
      {name: CPU tensor}         a temporary WeightsBuffer         (cleanup unlinks it)
      {name: CUDA tensor}        {"kind": "cuda_ipc", "storages", "tensors"}  CUDA IPC handles
                                                                  (one per storage), no host copy
    parse_cuda_ipc(desc)       worker side   -> {name: CudaHandle}, validated, nothing opened

CUDA IPC entries (transport/cuda_ipc.py, validated before anything reaches CUDA) are data
only, never a pickle. The caller keeps the tensors alive until the swap returns. Each engine
worker keeps the tensors of its last swap open until the next one (the re-open of the same
memory is then a torch handle-cache hit), so the trainer's memory behind the last pushed state
dict is freed one swap later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from thaw_agents_core.transport.cuda_ipc import (
    CudaHandle,
    export_storage,
    export_view,
    parse_storage,
    parse_view,
)
from thaw_agents_core.weights.buffer import WeightsBuffer

Source = str | os.PathLike | WeightsBuffer | Mapping[str, torch.Tensor]


def _noop() -> None:
    pass


def local_path(src: str | os.PathLike[str]) -> str:
    """A local .thaw path: ``s3://`` URLs are fetched into the validated local cache first."""
    if str(src).startswith("s3://"):
        from thaw_agents_core.weights.s3 import fetch

        return str(fetch(str(src)).path)
    return str(Path(src).expanduser().resolve())


def describe(
    src: Any, weights_version: str, layout: str = "auto"
) -> tuple[dict[str, Any], Callable[[], None]]:
    """The descriptor of ``src`` and a cleanup to call once every worker has loaded it."""
    if isinstance(src, (str, os.PathLike)):
        return {"kind": "file", "path": local_path(src)}, _noop
    if isinstance(src, WeightsBuffer):
        return src.descriptor(), _noop
    if isinstance(src, Mapping):
        if not src:
            raise ValueError("the state dict is empty")
        bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"state dict values must be tensors; not for {bad[:5]}")
        if all(t.is_cuda for t in src.values()):
            return describe_cuda_ipc(src, layout), _noop
        cpu = {n: t.detach().cpu() for n, t in src.items()}
        buf = WeightsBuffer.for_tensors(cpu)
        buf.write(cpu, weights_version, layout="checkpoint" if layout == "auto" else layout)
        return {**buf.descriptor(), "layout": layout}, buf.close
    raise TypeError(
        f"weights source must be a .thaw path, a WeightsBuffer or a state dict of "
        f"tensors, got {type(src).__name__}"
    )


def describe_cuda_ipc(src: Mapping[str, torch.Tensor], layout: str = "auto") -> dict[str, Any]:
    """CUDA tensors as IPC handles: each storage exported once, each tensor a view of one
    (a state dict over one flat buffer is one handle)."""
    index: dict[tuple[int, int], int] = {}
    storages: list[dict[str, Any]] = []
    views = []
    for name, t in src.items():
        storage = t.untyped_storage()
        device = t.get_device()
        key = (device, storage.data_ptr())
        i = index.get(key) if key[1] else None  # empty storages are never shared
        if i is None:
            i = len(storages)
            storages.append(export_storage(storage, device))
            if key[1]:
                index[key] = i
        views.append({"name": name, **export_view(t, i)})
    return {"kind": "cuda_ipc", "layout": layout, "storages": storages, "tensors": views}


def parse_cuda_ipc(desc: dict[str, Any]) -> dict[str, CudaHandle]:
    """``describe``'s handles, every field validated; no CUDA call yet (a swap opens each
    storage as it copies its first tensor, so the opens overlap the copies)."""
    storages, entries = desc.get("storages"), desc.get("tensors")
    if type(storages) is not list or type(entries) is not list:
        raise ValueError("cuda_ipc weights: 'storages' and 'tensors' must be lists")
    parsed = [parse_storage(s) for s in storages]
    out = {}
    for e in entries:
        if type(e) is not dict or type(e.get("name")) is not str:
            raise ValueError("cuda_ipc weights: every tensor entry needs a name")
        out[e["name"]] = parse_view(e, parsed)
    if len(out) != len(entries):
        raise ValueError("cuda_ipc weights: a tensor name appears twice")
    return out


def snapshot_version(src: Any) -> str | None:
    """The weights_version inside a ``.thaw`` file or WeightsBuffer (None for state dicts)."""
    if isinstance(src, (str, os.PathLike)):
        from thaw_agents_core.weights.format import parse_header
        from thaw_agents_core.weights.ranks import rank_path

        path = Path(local_path(src))
        if not path.is_file():
            path = rank_path(path, 0, _rank_count(path))
        with open(path, "rb") as f:
            head = f.read(16)
            import struct

            (n,) = struct.unpack_from("<Q", head, 8) if len(head) == 16 else (0,)
            f.seek(0)
            header, _ = parse_header(f.read(16 + min(n, 16 << 20)))
        return header.namespace.weights_version
    if isinstance(src, WeightsBuffer):
        with src.open() as view:
            return view.header.namespace.weights_version
    return None


def _rank_count(path: Path) -> int:
    """tp_size of a per-rank set named after ``path`` (x.tp0ofN.thaw), 1 if none."""
    for candidate in sorted(path.parent.glob(f"{path.stem}.tp0of*.thaw")):
        from thaw_agents_core.weights.ranks import split_rank_path

        return split_rank_path(candidate)[2]
    raise FileNotFoundError(
        f"no weight snapshot at {str(path)!r} (nor per-rank files {path.stem}.tp0ofN.thaw)"
    )


def resolve_version(src: Any, requested: str | None, current: str) -> str:
    """The version a swap installs: ``requested``, else the snapshot's own, else a fresh one;
    never the version already served (every swap fences the KV namespace)."""
    import secrets

    version = requested if requested is not None else snapshot_version(src)
    if version is None or (requested is None and version == current):
        version = f"w-{secrets.token_hex(6)}"
    if version == current:
        raise ValueError(
            f"weights_version {version!r} is the version this engine already serves: "
            "every swap needs a new one (e.g. the training step)"
        )
    return version
