"""thaw-agents core: engines, KV snapshots, stores, the vLLM connector and the worker pool.

No LangChain here. Names are imported lazily (``kv_transfer_config`` needs vLLM):

    from thaw_agents_core import kv_transfer_config, open_store, ForkPool, PrefixHandle
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from thaw_agents_core.util.compat import configure_vllm_environment

configure_vllm_environment()  # before anything imports vLLM: spawn, quiet logs (see compat)

_EXPORTS = {
    "kv_transfer_config": "thaw_agents_core.connector.settings",
    "open_store": "thaw_agents_core.store.url",
    "FileStore": "thaw_agents_core.store.file",
    "ShmStore": "thaw_agents_core.store.shm",
    "PrefixHandle": "thaw_agents_core.fork.prefix",
    "ForkPool": "thaw_agents_core.pool.fork_pool",
    "RayForkPool": "thaw_agents_core.pool.ray_pool",
    "Engine": "thaw_agents_core.engine.engine",
    "EngineSpec": "thaw_agents_core.engine.spec",
    "GenerationOptions": "thaw_agents_core.engine.sampling",
    "asnapshot_ids": "thaw_agents_core.fork.branches",
    "snapshot_ids": "thaw_agents_core.fork.branches",
    "run_branches": "thaw_agents_core.fork.branches",
    "Branch": "thaw_agents_core.fork.branches",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'thaw_agents_core' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
