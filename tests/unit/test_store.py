"""FileStore and ShmStore: longest-prefix lookup, atomic publish, eviction, layout, leaks.

In one process; what other processes see (and leave behind) is
tests/integration/test_store_processes.py.
"""

from __future__ import annotations

import os
import time

import pytest
from store_samples import (  # noqa: F401  (no_shm_leaks: an autouse fixture)
    BASE,
    BLOCK_BYTES,
    CAPACITY,
    KEY,
    NS,
    OTHER_KEY,
    chain,
    no_shm_leaks,
    shm_name,
    snapshot,
)

from thaw_agents_core.snapshot.chunks import verify_chunks
from thaw_agents_core.snapshot.format import parse_snapshot
from thaw_agents_core.store import base as store_mod
from thaw_agents_core.store.base import Match, SnapshotNotFoundError, SnapshotRef
from thaw_agents_core.store.file import FileStore
from thaw_agents_core.store.shm import ShmStore, ShmStoreFullError
from thaw_agents_core.store.url import open_store, parse_size


@pytest.fixture(params=["file", "shm"])
def store(request, tmp_path):
    s = (
        FileStore(tmp_path / "store")
        if request.param == "file"
        else ShmStore(shm_name(), CAPACITY, create=True)
    )
    yield s
    s.close()


# -- both stores --------------------------------------------------------------------------


def test_longest_prefix_wins(store):
    a = store.publish_bytes(KEY, snapshot(BASE[:12]))  # blocks 0-2
    b = store.publish_bytes(KEY, snapshot(BASE[:28]))  # blocks 0-6
    diverged = BASE[:16] + [7] * 16  # shares blocks 0-3, then differs
    c = store.publish_bytes(KEY, snapshot(diverged))
    assert store.lookup(KEY, chain(BASE)) == Match(b, 7)
    assert store.lookup(KEY, chain(BASE[:20])) == Match(b, 5)
    assert store.lookup(KEY, chain(diverged + [1] * 8)) == Match(c, 8)
    assert store.lookup(KEY, chain(BASE[:16] + [7] * 4)) == Match(c, 5)
    assert store.lookup(KEY, chain(BASE), max_blocks=3).num_blocks == 3
    assert store.lookup(KEY, chain(BASE[:12] + [5] * 4)).num_blocks == 3
    assert store.lookup(KEY, chain(BASE[:12]))  # every snapshot holds these 3 blocks
    assert {i.ref for i in store.list(KEY)} == {a, b, c}


def test_miss(store):
    store.publish_bytes(KEY, snapshot(BASE))
    assert store.lookup(KEY, chain([1] + BASE[1:])) is None  # first block differs
    assert store.lookup(KEY, []) is None
    assert store.lookup(KEY, chain(BASE), max_blocks=0) is None
    assert store.lookup(OTHER_KEY, chain(BASE)) is None  # another namespace
    with pytest.raises(ValueError, match="namespace_key must be 8-64 lowercase hex chars"):
        store.lookup("../../etc", chain(BASE))


def test_open_returns_identical_validated_bytes(store):
    data = snapshot(BASE)
    ref = store.publish_bytes(KEY, data)
    view = store.open(ref, expect_namespace=NS)
    assert bytes(view.payload) == bytes(parse_snapshot(data).payload)
    assert view.header.token_ids == BASE and verify_chunks(view) == []
    view.close()
    info = store.info(ref)
    assert (info.num_blocks, info.total_bytes) == (10, len(data))


def test_uncommitted_reservation_is_invisible(store):
    data = snapshot(BASE)
    r = store.reserve(len(data))
    r.buffer[: len(data)] = data
    assert store.lookup(KEY, chain(BASE)) is None and store.list(KEY) == []
    ref = r.commit(KEY)
    assert store.lookup(KEY, chain(BASE)) == Match(ref, 10)
    with store.reserve(len(data)) as r2:  # aborted on leaving the block
        r2.buffer[: len(data)] = snapshot(BASE, seed=1)
    assert len(store.list(KEY)) == 1


def test_two_phase_write_into_reservation(store):
    from thaw_agents_core.snapshot.io import plan_snapshot

    plan = plan_snapshot(NS, BASE[:8], BLOCK_BYTES, blocks_per_chunk=1)
    with store.reserve(plan.total_bytes) as r:
        payload = plan.payload_view(r.buffer)
        payload[:] = bytes(range(128))
        payload.release()
        plan.finish(r.buffer)
        ref = r.commit()
    with store.open(ref) as view:
        assert bytes(view.payload) == bytes(range(128)) and verify_chunks(view) == []


def test_commit_checks_namespace_and_validity(store):
    with store.reserve(8192) as r:
        with pytest.raises(ValueError, match="bad magic"):
            r.commit(KEY)
    data = snapshot(BASE)
    with store.reserve(len(data)) as r:
        r.buffer[: len(data)] = data
        with pytest.raises(
            ValueError,
            match=f"commit\\('{OTHER_KEY}'\\) but the snapshot's namespace key is '{KEY}'",
        ):
            r.commit(OTHER_KEY)
    assert store.list(KEY) == []


def test_delete(store):
    ref = store.publish_bytes(KEY, snapshot(BASE))
    assert store.delete(ref) and not store.delete(ref)
    assert store.lookup(KEY, chain(BASE)) is None
    with pytest.raises(SnapshotNotFoundError):
        store.open(ref)


def test_miss_is_cheap_once_the_directory_is_quiet(store, monkeypatch):
    store.publish_bytes(KEY, snapshot(BASE))
    calls = []
    real_listdir = os.listdir
    monkeypatch.setattr(store_mod.os, "listdir", lambda p: calls.append(p) or real_listdir(p))
    time.sleep(store_mod._RACY_NS / 1e9 + 0.02)
    store.lookup(KEY, chain(BASE))  # may re-list once: the mtime was too young to trust before
    calls.clear()
    for _ in range(100):
        assert store.lookup(KEY, chain([5] * 40)) is None
        assert store.lookup(KEY, chain(BASE)).num_blocks == 10
    assert calls == []  # a stat per lookup, no directory scan


# -- FileStore ----------------------------------------------------------------------------


def test_filestore_is_durable(tmp_path):
    ref = FileStore(tmp_path).publish_bytes(KEY, snapshot(BASE))
    assert os.path.exists(tmp_path / KEY / f"{ref.snapshot_id}.thawkv")
    assert os.listdir(tmp_path / ".tmp") == []
    again = FileStore(tmp_path)
    assert again.lookup(KEY, chain(BASE)) == Match(ref, 10)
    with again.open(ref) as view:
        assert view.header.snapshot_id == ref.snapshot_id


def test_filestore_skips_corrupt_and_temp_files(tmp_path):
    s = FileStore(tmp_path)
    ref = s.publish_bytes(KEY, snapshot(BASE[:8]))
    bad = bytearray(snapshot(BASE))
    bad[100] ^= 0xFF  # corrupt header JSON
    (tmp_path / KEY / "0123456789abcdef.thawkv").write_bytes(bad)
    (tmp_path / KEY / ".x.thawkv.tmp").write_bytes(snapshot(BASE))
    assert s.lookup(KEY, chain(BASE)) == Match(ref, 2)


def test_filestore_evicts_least_recently_used(tmp_path):
    size = len(snapshot(BASE[:8]))
    s = FileStore(tmp_path, max_bytes=3 * size)
    refs = [s.publish_bytes(KEY, snapshot(BASE[:8], seed=i)) for i in range(3)]
    s.open(refs[0]).close()  # refs[1] is now the least recently used
    new = s.publish_bytes(KEY, snapshot(BASE[:8], seed=3))
    assert {i.ref for i in s.list(KEY)} == {refs[0], refs[2], new}
    with pytest.raises(ValueError) as e:
        s.reserve(3 * size + 1)
    assert str(e.value) == (
        f"snapshot needs {3 * size + 1} bytes but FileStore('{tmp_path}', max_bytes={3 * size}) "
        f"holds at most max_bytes={3 * size}; raise max_bytes"
    )


# -- ShmStore -----------------------------------------------------------------------------


def test_shm_layout_and_cleanup():
    s = ShmStore(shm_name(), CAPACITY, create=True)
    data = snapshot(BASE)
    ref = s.publish_bytes(KEY, data)
    assert sorted(os.listdir(s.path)) == ["arena", "index", "lock", "meta.json", "reservations"]
    assert os.listdir(os.path.join(s.path, "index", KEY)) == [f"{ref.snapshot_id}.json"]
    assert os.path.getsize(os.path.join(s.path, "arena")) == CAPACITY == len(s.arena_view())
    offset, length = s.region_of(ref)
    assert offset % 4096 == 0 and s.arena_view()[offset : offset + length] == data
    attached = ShmStore(s.name, create=False)
    assert attached.lookup(KEY, chain(BASE)) == Match(ref, 10)
    with pytest.raises(RuntimeError, match="only the creator destroys it"):
        attached.destroy()
    attached.close()
    assert os.path.exists(s.path)  # attachers never unlink
    s.close()
    assert not os.path.exists(s.path)


def test_shm_create_and_attach_errors():
    name = shm_name()
    with pytest.raises(FileNotFoundError, match=f"no ShmStore '{name}'"):
        ShmStore(name, create=False)
    s = ShmStore(name, CAPACITY)  # create=None: created because missing
    try:
        assert s.is_owner
        with pytest.raises(FileExistsError, match="already exists"):
            ShmStore(name, CAPACITY, create=True)
        assert not ShmStore(name).is_owner  # create=None: attached because present
    finally:
        s.close()


def test_shm_reservation_larger_than_capacity():
    with ShmStore(shm_name(), CAPACITY, create=True) as s:
        with pytest.raises(ValueError) as e:
            s.reserve(CAPACITY + 1)
        assert str(e.value) == (
            f"snapshot needs {CAPACITY + 1} bytes but the shared-memory arena '{s.name}' holds {CAPACITY} "
            f"bytes: recreate the store with a larger capacity_bytes (e.g. shm://{s.name}?capacity=1MiB)"
        )


def test_shm_regions_never_overlap_and_evict_lru():
    with ShmStore(shm_name(), 6 * 4096, create=True) as s:
        data = [snapshot(BASE[:8], seed=i) for i in range(4)]  # 4096 + 128 bytes -> 2 pages each
        refs = [s.publish_bytes(KEY, d) for d in data[:3]]
        assert sorted(s.region_of(r)[0] for r in refs) == [0, 8192, 16384]
        s.open(refs[0]).close()  # refs[1] becomes least recently used
        new = s.publish_bytes(KEY, data[3])
        assert (
            s.region_of(new)[0] == s.region_of(refs[0])[0] + 8192 == 8192
        )  # took refs[1]'s region
        assert {i.ref for i in s.list(KEY)} == {refs[0], refs[2], new}
        with pytest.raises(SnapshotNotFoundError):
            s.open(refs[1])
        for ref, d in [(refs[0], data[0]), (refs[2], data[2]), (new, data[3])]:
            with s.open(ref) as view:
                assert bytes(view.payload) == bytes(parse_snapshot(d).payload)


def test_shm_full_of_pending_reservations():
    with ShmStore(shm_name(), 4 * 4096, create=True) as s:
        with s.reserve(3 * 4096):
            with pytest.raises(ShmStoreFullError) as e:
                s.reserve(2 * 4096)
            assert str(e.value) == (
                f"no 8192-byte gap in arena '{s.name}' (16384 bytes): "
                "12288 bytes are held by 1 pending reservation(s) of live processes"
            )
        s.reserve(4 * 4096).abort()  # freed by leaving the block


def test_shm_recycled_region_is_detected():
    with ShmStore(shm_name(), CAPACITY, create=True) as s:
        a = s.publish_bytes(KEY, snapshot(BASE))
        other = snapshot(BASE, seed=1)
        offset, _ = s.region_of(a)
        s.arena_view()[offset : offset + len(other)] = other  # a writer that got A's region
        with pytest.raises(SnapshotNotFoundError) as e:
            s.open(a)
        sid = parse_snapshot(other).header.snapshot_id
        assert str(e.value) == (
            f"region [{offset}, {offset + len(other)}) of arena '{s.name}' now holds snapshot {sid}, "
            f"not {a.snapshot_id}: it was evicted and reused"
        )


def test_shm_overwrite_while_reading_is_caught_by_crc():
    with ShmStore(shm_name(), CAPACITY, create=True) as s:
        ref = s.publish_bytes(KEY, snapshot(BASE))
        view = s.open(ref)
        offset, _ = s.region_of(ref)
        s.arena_view()[offset + view.payload_offset + 5 * BLOCK_BYTES] ^= 1  # block 5 -> chunk 2
        assert verify_chunks(view) == [2] and verify_chunks(view, num_blocks=4) == []
        view.close()


# -- open_store ---------------------------------------------------------------------------


def test_open_store_urls(tmp_path):
    assert isinstance(open_store(str(tmp_path / "a")), FileStore)
    fs = open_store(f"file://{tmp_path}/b?max_bytes=1MiB")
    assert isinstance(fs, FileStore) and fs.max_bytes == 1 << 20 and fs.root == str(tmp_path / "b")
    name = shm_name()
    with open_store(f"shm://{name}?capacity=256KiB") as s:
        assert isinstance(s, ShmStore) and s.capacity_bytes == 256 << 10 and s.is_owner
        with open_store(f"shm://{name}") as attached:
            assert not attached.is_owner
    with pytest.raises(ValueError, match="unsupported store URL 'redis://x'"):
        open_store("redis://x")
    with pytest.raises(ValueError, match="bad create='maybe'"):
        open_store("shm://x?capacity=1&create=maybe")
    assert [parse_size(x) for x in ("4096", "64MiB", "2g", "1 KiB")] == [
        4096,
        64 << 20,
        2 << 30,
        1024,
    ]
    assert SnapshotRef(KEY, "ab" * 8) == SnapshotRef(KEY, "ab" * 8)
