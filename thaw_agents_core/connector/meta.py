"""What crosses between the connector's scheduler side and worker side.

Direction, as vLLM names it: ``ThawConnectorMetadata`` goes scheduler -> worker once per
engine step (built by ``build_connector_meta``, bound before the forward pass). The worker
answers through the store itself (a published snapshot) and through vLLM's load-error report
(``get_block_ids_with_load_errors``), so no worker -> scheduler type is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


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
    """Scheduler -> worker, once per engine step: the loads and saves to run in it."""

    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)
