"""The weights version of each engine in this process: the KV namespace's ``weights_version``.

A hot swap (``ThawWorkerExtension.thaw_load_weights``, run in every worker through vLLM's
``collective_rpc``) sets the new version here; the ThawConnector's scheduler side (engine-core
process) and worker side read it when they compute their namespace, so KV saved under version
k is never loaded under k+1 (the namespace key differs -> refused -> recomputed).

    engine-core process (one engine, tensor-parallel size 1: vLLM's UniProcExecutor)
      worker extension  --set_weights_version(engine_id, "k+1")-->  _VERSIONS
      connector worker side  --weights_version(engine_id, default)-->  namespace (saves, loads)
      connector scheduler side  (same process)  -->  namespace (lookups, LoadOps)

With a multi-process executor (tensor parallel) the scheduler runs in another process and keeps
the old version; the worker side then refuses its stale LoadOps (key mismatch -> recompute), so
the failure mode is a cache miss, never wrong KV.

Keyed by ``KVTransferConfig.engine_id`` so in-process engines (tests) do not share a version.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_VERSIONS: dict[str, str] = {}


def engine_id_of(vllm_config: Any) -> str:
    """The key of an engine: its KV-transfer engine id ("" without a connector)."""
    kv = getattr(vllm_config, "kv_transfer_config", None)
    return str(getattr(kv, "engine_id", "") or "")


def set_weights_version(engine_id: str, version: str) -> None:
    """Record the version the engine's weights now are (called after a verified swap)."""
    if not isinstance(version, str):
        raise ValueError(f"weights_version must be a string, got {version!r}")
    with _LOCK:
        _VERSIONS[engine_id] = version


def weights_version(engine_id: str, default: str = "") -> str:
    """The engine's current weights version; ``default`` (its boot setting) if never swapped."""
    return _VERSIONS.get(engine_id, default)
