"""The vLLM KV connector: a thin facade (``facade.ThawConnector``) that builds the scheduler
side (``scheduler``) or the worker side (``worker``) by role; what crosses between them is the
metadata in ``meta``; settings are parsed once in ``settings``.

vLLM is told to import ``thaw_agents_core.connector.facade`` (``kv_transfer_config``); the
package itself also resolves ``ThawConnector`` lazily, so ``kv_connector_module_path =
"thaw_agents_core.connector"`` keeps working. Importing this package does not import vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ThawConnector", "kv_transfer_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from thaw_agents_core.connector import facade

        return getattr(facade, name)
    raise AttributeError(f"module 'thaw_agents_core.connector' has no attribute {name!r}")
