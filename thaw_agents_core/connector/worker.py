"""ThawConnector, worker side: snapshots after the forward, verified loads before it.

    register_kv_caches  the engine's per-layer KV tensors -> a KVTransport over them (and, on a
                        GPU, the shared-memory arena pinned once for full-speed DMA)
    start_load_kv       for each LoadOp: KVTransport.load (validate, copy, verify, scatter);
                        any failure -> the request's blocks are reported as load errors and
                        vLLM (kv_load_failure_policy="recompute") computes them instead
    wait_for_save       for each SaveOp: KVTransport.save (gather, checksum, publish)

Outcomes go to the log and, when configured, to an append-only JSON-lines event file.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from thaw_agents_core.connector.cost import cost_model_for
from thaw_agents_core.connector.events import EventLog
from thaw_agents_core.connector.meta import LoadOp, SaveOp, ThawConnectorMetadata
from thaw_agents_core.connector.settings import ConnectorSettings
from thaw_agents_core.snapshot.namespace import local_tensor_rank, namespace_for
from thaw_agents_core.store.base import SnapshotRef
from thaw_agents_core.transport.kv import KVTransport
from thaw_agents_core.transport.prefetch import DEFAULT_BUDGET_BYTES, DevicePrefetcher
from thaw_agents_core.transport.stream_scheduler import StreamScheduler
from thaw_agents_core.weights import fence

logger = logging.getLogger("thaw_agents.connector")

_LOCAL: dict[str, WorkerSide] = {}
"""Worker sides of this process by engine id: the scheduler side of the same engine finds its
worker's prefetcher here (vLLM runs both in the engine-core process with one GPU)."""


def local_prefetcher(engine_id: str) -> DevicePrefetcher | None:
    """The device prefetcher of this process's worker of ``engine_id`` (None: another
    process, or prefetching is off)."""
    worker = _LOCAL.get(engine_id)
    transport = worker.transport if worker is not None else None
    return transport.prefetcher if transport is not None else None


class WorkerSide:
    """Everything the ThawConnector does inside a vLLM worker (see the module docstring)."""

    def __init__(
        self, vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings, open_store: Any
    ) -> None:
        self.settings = settings
        self._vllm_config = vllm_config
        self._engine_id = fence.engine_id_of(vllm_config)
        self._rank = local_tensor_rank(vllm_config)
        self.namespace = namespace_for(vllm_config, settings.weights_version, self._rank)
        self._scheduler_key = namespace_for(vllm_config, settings.weights_version).key()
        """The key LoadOps name (the scheduler side's: rank 0's); this rank loads its own."""
        self.cost = cost_model_for(
            self.namespace.key(),
            synchronous_steps=not getattr(vllm_config.scheduler_config, "async_scheduling", False),
        )
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self.layer_names: list[str] = list(groups[0].layer_names) if len(groups) == 1 else []
        self._open_store = open_store
        self.events = EventLog(settings.events_path)
        self._load_errors: set[int] = set()
        self.transport: KVTransport | None = None
        if len(groups) != 1:
            logger.warning(
                "thaw: %d KV-cache groups (hybrid model); snapshots disabled", len(groups)
            )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM worker hook, once at startup: build the KVTransport over the layers' KV tensors
        (pinning the shm arena on a GPU); logs and leaves snapshots disabled if it cannot."""
        if not self.layer_names:
            return
        missing = [name for name in self.layer_names if name not in kv_caches]
        if missing:
            logger.warning("thaw: KV caches of %s not registered; snapshots disabled", missing)
            return
        layers = [kv_caches[name] for name in self.layer_names]
        copier = StreamScheduler(layers[0].device)
        store = self._open_store()
        arena = getattr(store, "arena_view", None)
        if arena is not None and copier.is_cuda and self.settings.pin_host:
            seconds = copier.register_host(arena())
            logger.info("thaw: pinned the shared-memory arena in %.2f s", seconds)
        try:
            self.transport = KVTransport(layers, self.namespace, store, copier)
        except ValueError as exc:
            logger.warning("thaw: %s; snapshots disabled", exc)
            copier.close()
            store.close()
            return
        budget = self.settings.device_prefetch_bytes
        if budget is None:
            budget = DEFAULT_BUDGET_BYTES if copier.is_cuda else 0
        if budget > 0:  # the transport's store: its arena is the one registered with CUDA
            transport = self.transport
            self.transport.prefetcher = DevicePrefetcher(
                copier.device, lambda: transport.store, lambda: self.namespace, budget
            )
        _LOCAL[self._engine_id] = self

    def refresh_namespace(self) -> None:
        """Follow a weight swap (weights/fence.py): saves and loads use the new version."""
        version = fence.weights_version(self._engine_id, self.settings.weights_version)
        if version != self.namespace.weights_version:
            self.namespace = namespace_for(self._vllm_config, version, self._rank)
            self._scheduler_key = namespace_for(self._vllm_config, version).key()
            if self.transport is not None:
                self.transport.namespace = self.namespace
                self.transport.namespace_key = self.namespace.key()
                if self.transport.prefetcher is not None:
                    self.transport.prefetcher.forget()

    # ------------------------------------------------------------------ load

    def start_load_kv(self, metadata: ThawConnectorMetadata) -> None:
        """vLLM worker hook, before the forward pass: run this step's loads (verified copies,
        then scatter); a failed load marks its blocks as load errors."""
        if metadata.loads or metadata.saves:
            self.refresh_namespace()
        for op in metadata.loads:
            self._load(op)

    def _load(self, op: LoadOp) -> None:
        began = time.perf_counter()
        try:
            if self.transport is None:
                raise RuntimeError("snapshots are disabled in this engine")
            key = op.namespace_key
            if key == self._scheduler_key:  # rank r loads its own shard of the snapshot
                key = self.namespace.key()
            stats = self.transport.load(
                SnapshotRef(key, op.snapshot_id),
                op.first_block,
                op.end_block,
                op.block_ids,
                op.expected_last_hash,
            )
            seconds = time.perf_counter() - began
            self.cost.on_load(stats.num_bytes, seconds)
            self.events.write(
                event="load",
                req_id=op.req_id,
                snapshot_id=op.snapshot_id,
                num_blocks=stats.num_blocks,
                bytes=stats.num_bytes,
                seconds=round(seconds, 6),
                prefetched=stats.prefetched,
            )
        except Exception as exc:  # noqa: BLE001 - any failure means: recompute these blocks
            self._load_errors.update(op.block_ids)
            reason = f"{type(exc).__name__}: {exc}"
            self.events.write(
                event="load_failed",
                req_id=op.req_id,
                snapshot_id=op.snapshot_id,
                num_blocks=len(op.block_ids),
                error=reason,
            )
            logger.warning(
                "thaw: not loading snapshot %s for %s (%s); vLLM recomputes %d block(s)",
                op.snapshot_id,
                op.req_id,
                reason,
                len(op.block_ids),
            )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM worker hook: the block ids whose loads failed since the last call (then
        cleared); vLLM recomputes them."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------------ save

    def wait_for_save(self, metadata: ThawConnectorMetadata) -> None:
        """vLLM worker hook, after the forward pass: run this step's saves (gather, checksum,
        publish); a failed save is logged, never raised."""
        for op in metadata.saves:
            self._save(op)

    def _save(self, op: SaveOp) -> None:
        began = time.perf_counter()
        try:
            if self.transport is None:
                raise RuntimeError("snapshots are disabled in this engine")
            _, stats = self.transport.save(
                op.token_ids, op.block_ids, snapshot_id=op.snapshot_id, extra=op.extra
            )
            self.events.write(
                event="save",
                req_id=op.req_id,
                snapshot_id=op.snapshot_id,
                num_blocks=stats.num_blocks,
                bytes=stats.num_bytes,
                seconds=round(time.perf_counter() - began, 6),
            )
        except Exception as exc:  # noqa: BLE001 - a failed save must not fail the request
            reason = f"{type(exc).__name__}: {exc}"
            self.events.write(
                event="save_failed", req_id=op.req_id, snapshot_id=op.snapshot_id, error=reason
            )
            logger.warning("thaw: snapshot %s of %s failed: %s", op.snapshot_id, op.req_id, reason)

    def close(self) -> None:
        """Close the transport's copier and store (idempotent)."""
        if _LOCAL.get(self._engine_id) is self:
            del _LOCAL[self._engine_id]
        if self.transport is not None:
            if self.transport.prefetcher is not None:
                self.transport.prefetcher.close()
            self.transport.copier.close()
            self.transport.store.close()
            self.transport = None
