"""What crosses between the connector's scheduler side and worker side, and its settings.

Direction, as vLLM names it: ``ThawConnectorMetadata`` goes scheduler -> worker once per
engine step (built by ``build_connector_meta``, bound before the forward pass). The worker
answers through the store itself (a published snapshot) and through vLLM's load-error report
(``get_block_ids_with_load_errors``), so no worker -> scheduler type is needed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from thaw_agents_core.prefix import PARAMS_KEY  # noqa: F401 - re-exported for the connector


@dataclass(slots=True)
class LoadOp:
    """Fill ``block_ids`` (the request's blocks) from snapshot blocks [first_block, end_block)."""

    req_id: str
    namespace_key: str
    snapshot_id: str
    first_block: int
    end_block: int
    block_ids: list[int]
    expected_last_hash: str
    """Hex hash of block end_block-1 as the scheduler matched it; rechecked on the header."""


@dataclass(slots=True)
class SaveOp:
    """Snapshot the request's first ``len(block_ids)`` blocks (its prompt's full blocks)."""

    req_id: str
    snapshot_id: str
    token_ids: list[int]
    block_ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ThawConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """``kv_connector_extra_config`` of the ThawConnector, validated."""

    store: str
    """Store URL: ``shm://NAME?capacity=4GiB``, ``file:///path`` or a plain directory path."""
    weights_version: str = ""
    """Bump when weights change in place (RL): part of the namespace."""
    events_path: str | None = None
    """Append one JSON line per load/save/failure here (tests and dashboards read it)."""
    load: bool = True
    """Look up and load published snapshots for new requests."""
    pin_host: bool = True
    """GPU: register the shared-memory arena with CUDA once, for full-speed DMA."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> "ConnectorSettings":
        extra = dict(extra or {})
        store = extra.pop("store", None)
        if not store or not isinstance(store, str):
            raise ValueError(
                "ThawConnector needs kv_connector_extra_config['store'] (e.g. 'shm://thaw' or a "
                f"directory path); got {store!r}"
            )
        known = {"weights_version", "events_path", "load", "pin_host"}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown ThawConnector settings {unknown}; valid: {sorted(known)}")
        return cls(store=store, **extra)


class EventLog:
    """Append-only JSON lines, one per load/save outcome (a metric tests and tools can read)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, **event: Any) -> None:
        if not self.path:
            return
        event.setdefault("time", round(time.time(), 6))
        event.setdefault("pid", os.getpid())
        line = json.dumps(event, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as handle:
            handle.write(line)
