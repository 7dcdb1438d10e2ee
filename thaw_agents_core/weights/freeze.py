"""Freezing weights into ``.thaw`` files: from a safetensors model folder (checkpoint layout).

A live engine freezes itself through ``Engine.freeze_weights`` (ThawWorkerExtension.thaw_freeze:
engine layout, one file per rank); this module covers the folder case, which needs no engine:

    freeze_safetensors(folder, "x.thaw", weights_version="step-0")
        every *.safetensors tensor (mmap'd by safetensors), names as in the folder -> one file,
        namespace layout "checkpoint" (vLLM's weight loaders fuse and shard it at restore)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from thaw_agents_core.weights.format import WeightsNamespace
from thaw_agents_core.weights.io import FreezeStats, write_weights


def folder_namespace(folder: str | Path, weights_version: str, dtype: str) -> WeightsNamespace:
    """The namespace of a model folder's checkpoint (architecture from its config.json)."""
    from thaw_agents_core.snapshot.namespace import model_fingerprint

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    archs = config.get("architectures") or [""]
    return WeightsNamespace(
        model_fingerprint=model_fingerprint(SimpleNamespace(model=str(folder))),
        architecture=str(archs[0]),
        dtype=dtype,
        layout="checkpoint",
        tp_rank=0,
        tp_size=1,
        weights_version=weights_version,
    )


def freeze_safetensors(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    weights_version: str = "",
    show_progress: bool | None = None,
    durable: bool = False,
) -> FreezeStats:
    """Every tensor of ``folder``'s ``*.safetensors`` files -> ``path`` (checkpoint layout;
    ``durable``: fsynced before returning)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(folder)!r}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    named = [(name, h.get_tensor(name)) for h in handles for name in h.keys()]
    dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in named})
    ns = folder_namespace(folder, weights_version, dtypes[0] if len(dtypes) == 1 else "mixed")
    return write_weights(
        path,
        named,
        ns,
        extra={"source": str(folder)},
        show_progress=show_progress,
        durable=durable,
    )
