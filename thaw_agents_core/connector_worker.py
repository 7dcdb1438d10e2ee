"""ThawConnector, worker side: snapshot blocks into the store; load, verify, scatter them back.

Save (after the forward that computed a request's last prompt block, in ``wait_for_save``)::

    KV cache (all layers) --kv_gather, one launch--> contiguous block-major payload
      --StreamScheduler.to_host (CRC32C per chunk)--> store reservation (shared memory / file)
      --plan.finish (header with the CRCs)--> commit: visible to every process at once

Load (before the forward that needs the blocks, in ``start_load_kv``)::

    store.open (header, namespace, bounds validated) --StreamScheduler.to_device--> staging
      --CRC32C of every chunk compared with the header--> kv_scatter into the blocks vLLM
      allocated for the request

Nothing is written into the cache before the header, bounds and the chunk checksums of the
data being written are verified. Any failure reports the request's blocks to vLLM as load
errors, and vLLM (kv_load_failure_policy="recompute") computes them instead: a fork never
produces output from bad KV.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import torch

from thaw_agents_core import compat
from thaw_agents_core.connector_meta import ConnectorSettings, LoadOp, SaveOp, ThawConnectorMetadata
from thaw_agents_core.kv_namespace import namespace_for
from thaw_agents_core.snapshot_format import (
    SnapshotChecksumError,
    SnapshotError,
    SnapshotMismatchError,
    default_blocks_per_chunk,
    plan_snapshot,
)
from thaw_agents_core.store import SnapshotRef, SnapshotStore
from thaw_agents_core.stream_scheduler import StreamScheduler, as_uint8_tensor
from thaw_kernels import kv_gather, kv_scatter, page_spec_for

logger = logging.getLogger("thaw_agents.connector")


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


class WorkerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings,
                 open_store: Any) -> None:
        self.settings = settings
        self.namespace = namespace_for(vllm_config, settings.weights_version)
        self.namespace_key = self.namespace.key()
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self.layer_names: list[str] = list(groups[0].layer_names) if len(groups) == 1 else []
        self.enabled = len(groups) == 1
        if not self.enabled:
            logger.warning("thaw: %d KV-cache groups (hybrid model); snapshots disabled",
                           len(groups))
        self._open_store = open_store
        self._store: SnapshotStore | None = None
        self.events = EventLog(settings.events_path)
        self._load_errors: set[int] = set()
        self.layers: list[torch.Tensor] = []

    @property
    def store(self) -> SnapshotStore:
        if self._store is None:
            self._store = self._open_store()
            arena = getattr(self._store, "arena_view", None)
            if arena is not None and self.copier.is_cuda and self.settings.pin_host:
                seconds = self.copier.register_host(arena())
                logger.info("thaw: pinned the shared-memory arena in %.2f s", seconds)
        return self._store

    # ------------------------------------------------------------------ registration

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        missing = [name for name in self.layer_names if name not in kv_caches]
        if missing:
            self.enabled = False
            logger.warning("thaw: KV caches of %s not registered; snapshots disabled", missing)
            return
        self.layers = [kv_caches[name] for name in self.layer_names]
        self.spec = page_spec_for(self.layers[0], compat.kv_layout_name())
        element = self.layers[0].element_size()
        self.block_bytes = len(self.layers) * self.spec.num_halves * self.spec.page_elems * element
        expected = 1
        for dim in self.namespace.page_shape:
            expected *= dim
        if self.spec.num_halves * self.spec.page_elems != 2 * expected:
            self.enabled = False
            logger.warning("thaw: KV page of %d elements does not match namespace page shape %s;"
                           " snapshots disabled", self.spec.page_elems, self.namespace.page_shape)
            return
        self.blocks_per_chunk = default_blocks_per_chunk(self.block_bytes)
        self.copier = StreamScheduler(self.layers[0].device)
        self.store  # open (and pin) now, not on the first request's critical path

    def _blocks_view(self, raw: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """A uint8 buffer seen as [blocks, layers, halves, page] of the cache dtype."""
        return raw.view(self.layers[0].dtype).view(
            num_blocks, len(self.layers), self.spec.num_halves, self.spec.page_elems)

    # ------------------------------------------------------------------ load

    def start_load_kv(self, metadata: ThawConnectorMetadata) -> None:
        for op in metadata.loads:
            self._load(op)

    def _load(self, op: LoadOp) -> None:
        began = time.perf_counter()
        view = None
        try:
            if not self.enabled:
                raise SnapshotError("snapshots are disabled in this engine")
            if op.namespace_key != self.namespace_key:
                raise SnapshotMismatchError([f"namespace key: snapshot has {op.namespace_key}, "
                                             f"this engine has {self.namespace_key}"])
            view = self.store.open(SnapshotRef(op.namespace_key, op.snapshot_id),
                                   expect_namespace=self.namespace)
            header = view.header
            self._check_bounds(op, header)
            per_chunk = header.blocks_per_chunk
            first_chunk, last_chunk = op.first_block // per_chunk, (op.end_block - 1) // per_chunk
            lo = first_chunk * per_chunk * header.block_bytes
            hi = min((last_chunk + 1) * per_chunk, header.num_blocks) * header.block_bytes
            staging = torch.empty(hi - lo, dtype=torch.uint8, device=self.layers[0].device)
            crcs = self.copier.to_device(view.payload[lo:hi], staging,
                                         per_chunk * header.block_bytes).tolist()
            expected = header.chunk_crc32c[first_chunk:last_chunk + 1]
            bad = [first_chunk + i for i, (got, want) in enumerate(zip(crcs, expected))
                   if got != want]
            if bad:
                raise SnapshotChecksumError(bad, header.num_chunks)
            skip = (op.first_block - first_chunk * per_chunk) * header.block_bytes
            count = op.end_block - op.first_block
            blocks = staging[skip:skip + count * header.block_bytes]
            kv_scatter(self._blocks_view(blocks, count), self.layers, op.block_ids, self.spec)
            seconds = time.perf_counter() - began
            self.events.write(event="load", req_id=op.req_id, snapshot_id=op.snapshot_id,
                              num_blocks=count, bytes=count * header.block_bytes,
                              seconds=round(seconds, 6))
            logger.debug("thaw: loaded %d blocks of %s in %.4f s", count, op.snapshot_id, seconds)
        except Exception as exc:  # noqa: BLE001 - any failure means: recompute these blocks
            self._load_errors.update(op.block_ids)
            reason = f"{type(exc).__name__}: {exc}"
            self.events.write(event="load_failed", req_id=op.req_id, snapshot_id=op.snapshot_id,
                              num_blocks=len(op.block_ids), error=reason)
            logger.warning("thaw: not loading snapshot %s for %s (%s); vLLM recomputes %d "
                           "block(s)", op.snapshot_id, op.req_id, reason, len(op.block_ids))
        finally:
            if view is not None:
                view.close()

    def _check_bounds(self, op: LoadOp, header: Any) -> None:
        if not (0 <= op.first_block < op.end_block <= header.num_blocks):
            raise SnapshotError(f"blocks [{op.first_block}, {op.end_block}) are outside the "
                                f"snapshot's {header.num_blocks} blocks")
        if header.block_hashes[op.end_block - 1].hex() != op.expected_last_hash:
            raise SnapshotError("the snapshot's block-hash chain differs from the request's")
        if header.block_bytes != self.block_bytes:
            raise SnapshotError(f"snapshot blocks are {header.block_bytes} bytes, this engine's "
                                f"are {self.block_bytes}")
        if len(op.block_ids) != op.end_block - op.first_block:
            raise SnapshotError(f"{len(op.block_ids)} destination blocks for "
                                f"{op.end_block - op.first_block} snapshot blocks")

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------------ save

    def wait_for_save(self, metadata: ThawConnectorMetadata) -> None:
        for op in metadata.saves:
            self._save(op)

    def _save(self, op: SaveOp) -> None:
        began = time.perf_counter()
        try:
            if not self.enabled:
                raise SnapshotError("snapshots are disabled in this engine")
            num_blocks = len(op.block_ids)
            plan = plan_snapshot(self.namespace, op.token_ids, self.block_bytes,
                                 blocks_per_chunk=self.blocks_per_chunk,
                                 snapshot_id=op.snapshot_id, extra=op.extra)
            chunk_bytes = self.blocks_per_chunk * self.block_bytes
            with self.store.reserve(plan.total_bytes) as reservation:
                payload = as_uint8_tensor(plan.payload_view(reservation.buffer))
                if self.copier.is_cuda:
                    gathered = kv_gather(self.layers, op.block_ids, self.spec)
                    crcs = self.copier.to_host(gathered.view(-1).view(torch.uint8), payload,
                                               chunk_bytes)
                else:  # CPU: gather straight into shared memory, then checksum it there
                    kv_gather(self.layers, op.block_ids, self.spec,
                              out=self._blocks_view(payload, num_blocks))
                    from thaw_kernels import chunk_crc32c

                    crcs = chunk_crc32c(payload, chunk_bytes).tolist()
                del payload
                plan.finish(reservation.buffer, crcs)
                reservation.commit(self.namespace_key)
            seconds = time.perf_counter() - began
            self.events.write(event="save", req_id=op.req_id, snapshot_id=op.snapshot_id,
                              num_blocks=num_blocks, bytes=plan.payload_bytes,
                              seconds=round(seconds, 6))
        except Exception as exc:  # noqa: BLE001 - a failed save must not fail the request
            reason = f"{type(exc).__name__}: {exc}"
            self.events.write(event="save_failed", req_id=op.req_id,
                              snapshot_id=op.snapshot_id, error=reason)
            logger.warning("thaw: snapshot %s of %s failed: %s", op.snapshot_id, op.req_id,
                           reason)

    def close(self) -> None:
        if self._store is not None:
            if hasattr(self, "copier"):
                self.copier.close()
            self._store.close()
            self._store = None
