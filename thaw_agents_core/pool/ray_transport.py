"""How a snapshot's KV bytes reach the shared-memory store of every Ray node that runs branches.

    driver (owns the parent's store)              node N (its NodeStore actor owns an shm arena)
    prompt -> block-hash chain -> lookup -> ref
    stage(ref), once per snapshot:                ingest(message, data), once per (node, snapshot):
      "object_store": ray.put(bytes) -> ObjectRef   reserve in the node's arena, copy in (a view of
      a shared directory: publish (FileStore)        the node's plasma store, a file of the shared
      "s3://bucket/prefix": upload                   directory, an S3 object), then parse the header,
                                                     check the namespace key and every chunk's
                                                     CRC32C in the arena itself; commit, or abort
    message = StagedSnapshot.message (JSON-ready: kind, namespace_key, snapshot_id, nbytes, url)

Branches on node N then find the prefix in N's arena through their connector, at memory speed.
Default "object_store" (benchmarks/results/ray_pool_cpu.json, a 44 MB SmolLM2 snapshot, one
machine): 0.33 s per node copy vs 0.40 s through a shared directory on local disk (whose
publish + fsync alone takes 0.26 s), and no shared file system to set up.
A failed ingest never fails a branch: its worker recomputes the prefix (the connector verifies
again when it loads). Data only: JSON messages and raw ``.thawkv`` bytes, never pickle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from thaw_agents_core.snapshot.block_hashes import block_hash_chain
from thaw_agents_core.snapshot.chunks import check_chunks
from thaw_agents_core.snapshot.format import encode_header, parse_snapshot
from thaw_agents_core.store.base import Match, SnapshotNotFoundError, SnapshotRef, SnapshotStore
from thaw_agents_core.store.file import FileStore

logger = logging.getLogger("thaw_agents.pool")

OBJECT_STORE = "object_store"


def check_transport(transport: str) -> str:
    """``"object_store"``, ``s3://BUCKET/PREFIX``, ``file:///DIR`` or a directory path."""
    if not isinstance(transport, str) or not transport:
        raise ValueError(
            f"snapshot_transport must be 'object_store', a shared directory or "
            f"s3://BUCKET/PREFIX, got {transport!r}"
        )
    if transport.startswith("s3://") and not transport[5:].strip("/"):
        raise ValueError(
            f"snapshot_transport {transport!r} names no bucket: use s3://BUCKET/PREFIX"
        )
    if "://" in transport and not transport.startswith(("s3://", "file://")):
        raise ValueError(
            f"unsupported snapshot_transport {transport!r}: use 'object_store', "
            "s3://BUCKET/PREFIX, file:///DIR or a directory every node mounts"
        )
    return transport


def _directory(transport: str) -> str:
    return transport[len("file://") :] if transport.startswith("file://") else transport


def _s3_url(transport: str, ref: SnapshotRef) -> str:
    base = transport.rstrip("/")
    return f"{base}/{ref.namespace_key}/{ref.snapshot_id}.thawkv"


def snapshot_bytes(store: SnapshotStore, ref: SnapshotRef) -> bytes:
    """The complete ``.thawkv`` bytes of ``ref`` (raises SnapshotNotFoundError when gone)."""
    view = store.open(ref)
    try:
        return encode_header(view.header) + bytes(view.payload)
    finally:
        view.close()


@dataclass(slots=True)
class StagedSnapshot:
    """A snapshot made readable for every node: the JSON message and, for the object store,
    the ``ObjectRef`` of its bytes (passed to Ray as a top-level argument, so each node reads
    it from its own plasma store)."""

    message: dict[str, Any]
    data: Any = None
    stage_s: float = 0.0


def stage_snapshot(store: SnapshotStore, ref: SnapshotRef, transport: str) -> StagedSnapshot:
    """Driver side: copy the snapshot where every node can read it (see the module docstring)."""
    began = time.perf_counter()
    data = snapshot_bytes(store, ref)
    message: dict[str, Any] = {
        "namespace_key": ref.namespace_key,
        "snapshot_id": ref.snapshot_id,
        "nbytes": len(data),
    }
    staged = StagedSnapshot(message)
    if transport == OBJECT_STORE:
        import numpy as np
        import ray

        message["kind"] = OBJECT_STORE
        staged.data = ray.put(np.frombuffer(data, dtype=np.uint8))  # plasma: zero-copy reads
    elif transport.startswith("s3://"):
        from thaw_agents_core.store.s3 import upload_snapshot

        message.update(kind="s3", url=_s3_url(transport, ref))
        upload_snapshot(data, message["url"])
    else:
        message.update(kind="shared", url=_directory(transport))
        shared = FileStore(message["url"])
        try:
            shared.info(ref)  # already there (an earlier round or another driver)
        except SnapshotNotFoundError:
            shared.publish_bytes(ref.namespace_key, data)
        finally:
            shared.close()
    staged.stage_s = time.perf_counter() - began
    return staged


def _fill(buffer: memoryview, message: dict[str, Any], data: Any) -> None:
    """Copy the snapshot's bytes into ``buffer`` (one copy, from wherever the message says)."""
    nbytes = message["nbytes"]
    kind = message.get("kind")
    if kind == OBJECT_STORE:
        source = memoryview(data).cast("B")
        if len(source) != nbytes:
            raise ValueError(f"object-store snapshot has {len(source)} bytes, expected {nbytes}")
        buffer[:nbytes] = source
        return
    if kind == "shared":
        path = FileStore(message["url"]).path_of(
            SnapshotRef(message["namespace_key"], message["snapshot_id"])
        )
        _read_into(path, buffer, nbytes)
        return
    if kind == "s3":
        from thaw_agents_core.store.s3 import download_snapshot

        with tempfile.TemporaryDirectory(prefix="thaw-ray-s3-") as tmp:
            path = os.path.join(tmp, "snapshot.thawkv")
            download_snapshot(message["url"], path)
            _read_into(path, buffer, nbytes)
        return
    raise ValueError(f"unknown snapshot message kind {kind!r}; valid: object_store, shared, s3")


def _read_into(path: str, buffer: memoryview, nbytes: int) -> None:
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < nbytes:
            got = f.readinto(buffer[done:nbytes])
            if not got:
                raise ValueError(f"{path} ended after {done} of {nbytes} bytes")
            done += got


def ingest_snapshot(store: SnapshotStore, message: dict[str, Any], data: Any = None) -> dict:
    """Node side: publish the staged snapshot into this node's ``store``, verified in place.

    Returns ``{"ok": True, "cached": bool, "nbytes", "copy_s", "verify_s"}``; raises
    ``SnapshotError`` (bad header or checksum) or ``ValueError`` (wrong size or namespace),
    leaving nothing published.
    """
    ref = SnapshotRef(message["namespace_key"], message["snapshot_id"])
    try:
        store.info(ref)
        return {
            "ok": True,
            "cached": True,
            "nbytes": message["nbytes"],
            "copy_s": 0.0,
            "verify_s": 0.0,
        }
    except SnapshotNotFoundError:
        pass
    began = time.perf_counter()
    with store.reserve(message["nbytes"]) as reservation:
        _fill(reservation.buffer, message, data)
        copied = time.perf_counter()
        view = parse_snapshot(reservation.buffer)
        try:
            if view.header.snapshot_id != ref.snapshot_id:
                raise ValueError(
                    f"staged bytes hold snapshot {view.header.snapshot_id}, not {ref.snapshot_id}"
                )
            check_chunks(view)  # in the arena: what the node's engines will read
        finally:
            view.payload.release()
        verified = time.perf_counter()
        reservation.commit(ref.namespace_key)
    return {
        "ok": True,
        "cached": False,
        "nbytes": message["nbytes"],
        "copy_s": copied - began,
        "verify_s": verified - copied,
    }


class NodeStore:
    """The Ray actor (num_cpus=0, pinned to its node) that owns one node's shared-memory arena:
    ``url()`` is what the node's engines attach to, ``ingest`` copies a staged snapshot in,
    ``close()`` unlinks the arena."""

    def __init__(self, name: str, capacity_bytes: int) -> None:
        from thaw_agents_core.store.shm import ShmStore

        self.store = ShmStore(name, capacity_bytes, create=True)
        self.name = name

    def url(self) -> str:
        """The store URL the node's engines attach to (never create)."""
        return f"shm://{self.name}?create=false"

    def ingest(self, message_json: str, data: Any = None) -> str:
        """``ingest_snapshot`` into this node's arena; its result as JSON."""
        return json.dumps(ingest_snapshot(self.store, json.loads(message_json), data))

    def close(self) -> None:
        """Close and unlink this node's arena."""
        self.store.close()


# ---------------------------------------------------------------------- driver side


class NodeCopies:
    """The driver's record of which node holds which snapshot, and the NodeStore actors.

    ``ensure(node_id, ref)`` stages ``ref`` once (the last ``keep`` staged copies are kept, e.g.
    their ObjectRefs) and ingests it once per node; concurrent branches share one copy. Runs on
    the pool's event loop.
    """

    def __init__(
        self,
        parent_store: SnapshotStore,
        transport: str,
        *,
        name: str,
        capacity_bytes: int,
        timeout_s: float,
        keep: int = 2,
    ) -> None:
        self.parent_store, self.transport, self.name = parent_store, transport, name
        self.capacity_bytes, self.timeout_s, self.keep = capacity_bytes, timeout_s, keep
        self.transfers: list[dict[str, Any]] = []
        self._stores: dict[str, asyncio.Future] = {}
        self._staged: OrderedDict[tuple[str, str], asyncio.Future] = OrderedDict()
        self._copies: dict[tuple[str, str], asyncio.Future] = {}

    def lookup(self, prompt_ids: list[int], namespace_key: str, block_size: int) -> Match | None:
        """The parent store's longest snapshot of ``prompt_ids`` (None: nothing to send)."""
        chain = block_hash_chain(prompt_ids, block_size)
        return self.parent_store.lookup(namespace_key, chain) if chain else None

    async def store_of(self, node_id: str) -> Any:
        """The NodeStore actor of ``node_id``, created (pinned to that node) on first use."""
        future = self._stores.get(node_id)
        if future is None:
            future = self._stores[node_id] = asyncio.get_running_loop().create_future()
            try:
                future.set_result(await self._create_store(node_id))
            except BaseException as exc:
                self._stores.pop(node_id, None)
                future.set_exception(exc)
                raise
        return await asyncio.shield(future)

    async def _create_store(self, node_id: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        store = (
            ray.remote(NodeStore)
            .options(
                name=f"{self.name}-store-{node_id[:12]}",
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(f"{self.name}-{node_id[:12]}", self.capacity_bytes)
        )
        await asyncio.wait_for(store.url.remote(), self.timeout_s)
        return store

    def stores(self) -> list[Any]:
        """Every NodeStore actor that started."""
        return [f.result() for f in self._stores.values() if f.done() and not f.exception()]

    def forget(self, node_id: str, snapshot_id: str | None = None) -> None:
        """Drop what is known of ``node_id`` (one snapshot, or the node and its store)."""
        if snapshot_id is not None:
            self._copies.pop((node_id, snapshot_id), None)
            return
        self._stores.pop(node_id, None)
        for key in [k for k in self._copies if k[0] == node_id]:
            del self._copies[key]

    def clear(self) -> None:
        """Forget every staged copy, node copy and NodeStore actor (kills none of them)."""
        self._staged.clear()
        self._copies.clear()
        self._stores.clear()

    async def ensure(self, node_id: str, ref: SnapshotRef) -> bool:
        """Copy ``ref`` into ``node_id``'s store unless it is there; False (logged) when that
        failed: the branch then recomputes the prefix."""
        key = (node_id, ref.snapshot_id)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = asyncio.ensure_future(self._copy(node_id, ref))
        try:
            await asyncio.shield(copy)
            return True
        except Exception as exc:  # noqa: BLE001 - the branch still runs, from scratch
            self._copies.pop(key, None)
            logger.warning(
                "thaw: snapshot %s did not reach node %s (%s: %s); its branches "
                "recompute the prefix",
                ref.snapshot_id,
                node_id[:12],
                type(exc).__name__,
                exc,
            )
            return False

    async def _stage(self, ref: SnapshotRef) -> StagedSnapshot:
        key = (self.transport, ref.snapshot_id)
        staged = self._staged.get(key)
        if staged is None:
            staged = self._staged[key] = asyncio.ensure_future(
                asyncio.to_thread(stage_snapshot, self.parent_store, ref, self.transport)
            )
            while len(self._staged) > self.keep:
                self._staged.popitem(last=False)
        self._staged.move_to_end(key)
        try:
            return await asyncio.shield(staged)
        except Exception:
            self._staged.pop(key, None)
            raise

    async def _copy(self, node_id: str, ref: SnapshotRef) -> None:
        import ray

        began = time.perf_counter()
        staged = await self._stage(ref)
        store = await self.store_of(node_id)
        args = [json.dumps(staged.message)] + ([staged.data] if staged.data is not None else [])
        try:
            stats = json.loads(await asyncio.wait_for(store.ingest.remote(*args), self.timeout_s))
        except ray.exceptions.RayActorError:
            self.forget(node_id)  # its node died: a new store is made on demand
            raise
        self.transfers.append(
            {
                "node_id": node_id,
                "snapshot_id": ref.snapshot_id,
                "transport": staged.message["kind"],
                "stage_s": staged.stage_s,
                "ship_s": time.perf_counter() - began,
                **stats,
            }
        )
