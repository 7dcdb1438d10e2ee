"""Snapshot shipping for RayForkPool without Ray: stage into a shared directory, ingest into a
node's shared-memory store, checksums verified in the arena (tests/integration/test_ray_pool.py
runs the object-store path on a real cluster)."""

from __future__ import annotations

import numpy as np
import pytest
from store_samples import (  # noqa: F401  (no_shm_leaks: an autouse fixture)
    BASE,
    CAPACITY,
    KEY,
    chain,
    no_shm_leaks,
    shm_name,
    snapshot,
)

from thaw_agents_core.pool.ray_actor import spec_on_store
from thaw_agents_core.pool.ray_transport import (
    check_transport,
    ingest_snapshot,
    snapshot_bytes,
    stage_snapshot,
)
from thaw_agents_core.snapshot.errors import SnapshotChecksumError
from thaw_agents_core.store.base import SnapshotNotFoundError
from thaw_agents_core.store.file import FileStore
from thaw_agents_core.store.shm import ShmStore


@pytest.fixture
def parent(tmp_path):
    store, data = FileStore(tmp_path / "parent"), snapshot(BASE)
    return store, store.publish_bytes(KEY, data), bytes(data)


def test_shared_directory_round_trip_is_byte_exact(parent, tmp_path):
    store, ref, data = parent
    staged = stage_snapshot(store, ref, str(tmp_path / "shared"))
    assert staged.data is None and staged.message["kind"] == "shared"
    assert FileStore(tmp_path / "shared").info(ref).ref == ref
    with ShmStore(shm_name(), CAPACITY, create=True) as node:
        stats = ingest_snapshot(node, staged.message)
        assert stats["ok"] and not stats["cached"] and stats["nbytes"] == len(data)
        assert snapshot_bytes(node, ref) == snapshot_bytes(store, ref) == data
        assert node.lookup(KEY, chain(BASE)).ref == ref  # what the node's connector asks
        assert ingest_snapshot(node, staged.message)["cached"]  # the second copy is skipped
        # staging again (another round, another driver) reuses the shared file
        assert stage_snapshot(store, ref, f"file://{tmp_path / 'shared'}").message == {
            **staged.message,
            "url": str(tmp_path / "shared"),
        }


def test_object_store_bytes_are_verified_in_the_arena(parent):
    store, ref, raw = parent
    data = np.frombuffer(raw, dtype=np.uint8).copy()
    message = {
        "kind": "object_store",
        "namespace_key": ref.namespace_key,
        "snapshot_id": ref.snapshot_id,
        "nbytes": len(data),
    }
    with ShmStore(shm_name(), CAPACITY, create=True) as node:
        data[-1] ^= 0xFF  # one flipped payload byte: its chunk's CRC32C fails
        with pytest.raises(SnapshotChecksumError):
            ingest_snapshot(node, message, data)
        with pytest.raises(SnapshotNotFoundError):
            node.info(ref)  # nothing was published
        data[-1] ^= 0xFF
        with pytest.raises(ValueError, match="bytes, expected"):
            ingest_snapshot(node, {**message, "nbytes": len(data) + 1}, data)
        assert not ingest_snapshot(node, message, data)["cached"]
        assert node.info(ref).total_bytes == len(data)


def test_transport_names_and_node_spec():
    assert check_transport("object_store") == "object_store"
    assert check_transport("s3://bucket/prefix") == "s3://bucket/prefix"
    for bad in ("", "http://host/x", "s3://"):
        with pytest.raises(ValueError):
            check_transport(bad)

    from thaw_agents_core.connector.settings import kv_transfer_config
    from thaw_agents_core.engine.spec import EngineSpec

    spec = EngineSpec.create(
        "m", kv_transfer=kv_transfer_config("shm://parent?capacity=1GiB", weights_version="v1")
    )
    moved = spec_on_store(spec, "shm://node-a?create=false")
    assert moved.connector_settings.store == "shm://node-a?create=false"
    assert moved.connector_settings.weights_version == "v1" and moved.model == spec.model
