"""thaw-agents core: engines, KV snapshots, stores, the vLLM connector and the worker pool.

No LangChain here. Names are imported lazily (``kv_transfer_config`` needs vLLM):

    from thaw_agents_core import kv_transfer_config, open_store, ForkPool, PrefixHandle
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "kv_transfer_config": "thaw_agents_core.connector",
    "open_store": "thaw_agents_core.store_url",
    "FileStore": "thaw_agents_core.file_store",
    "ShmStore": "thaw_agents_core.shm_store",
    "PrefixHandle": "thaw_agents_core.prefix",
    "ForkPool": "thaw_agents_core.pool",
    "Engine": "thaw_agents_core.engine",
    "EngineSpec": "thaw_agents_core.engine",
    "GenerationOptions": "thaw_agents_core.sampling",
    "asnapshot_ids": "thaw_agents_core.forking",
    "snapshot_ids": "thaw_agents_core.forking",
    "run_branches": "thaw_agents_core.forking",
    "Branch": "thaw_agents_core.forking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'thaw_agents_core' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
