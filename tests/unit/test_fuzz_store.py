"""Fuzzing what a shared-memory store reads from other processes: its index descriptors
(``index/<namespace_key>/<snapshot_id>.json``), reservation records and ``meta.json``.

A store sits on vLLM's scheduler path (``lookup``, ``open`` through the verifier), so a broken
entry must never raise out of it. Documented: ``lookup`` / ``list`` / ``info`` skip an unreadable
entry ("corrupt: skip it, never serve it"); ``open`` raises what a store documents
(``SnapshotNotFoundError``, ``SnapshotError``, ``ValueError``: the verifier's catch set);
``reserve`` treats an unreadable record as abandoned. Attaching to a store whose ``meta.json``
is broken raises ``ValueError`` or ``OSError``.

Every store here lives under a private ``shm_root`` (a temporary directory), not /dev/shm.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.snapshot.format import parse_snapshot
from thaw_agents_core.snapshot.io import build_snapshot
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import SnapshotNotFoundError, SnapshotRef
from thaw_agents_core.store.shm import ShmDescriptor, ShmStore

try:
    from .fuzz_profiles import (
        FUZZ_TIMEOUT,
        INVALID_UTF8,
        RAW_JSON,
        fuzz,
        hostile_json,
        json_values,
        render,
    )
except ImportError:  # tests/unit is not a package: pytest put it on sys.path
    from fuzz_profiles import (
        FUZZ_TIMEOUT,
        INVALID_UTF8,
        RAW_JSON,
        fuzz,
        hostile_json,
        json_values,
        render,
    )

pytestmark = FUZZ_TIMEOUT

OPEN_ERRORS = (SnapshotError, SnapshotNotFoundError, ValueError)
NS = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
KEY = NS.key()
TOKENS = list(range(100, 112))
DATA = bytes(
    build_snapshot(
        NS,
        TOKENS,
        64,
        bytes(range(192)),
        blocks_per_chunk=2,
        snapshot_id="0123456789abcdef",
        created_unix=1700000000,
    )
)
CHAIN = parse_snapshot(DATA).header.block_hashes
OTHER = SnapshotRef(KEY, "fedcba9876543210")  # the entry each example writes


@pytest.fixture(scope="module")
def shm():
    with tempfile.TemporaryDirectory(prefix="thaw-fuzz-shm-") as root:
        store = ShmStore("fuzz", 1 << 20, create=True, shm_root=root)
        good = store.publish_bytes(KEY, DATA)
        with open(store._descriptor_path(good)) as f:
            descriptor = json.load(f)
        yield store, root, good, descriptor
        store.close()


def entries(descriptor: dict) -> st.SearchStrategy[bytes]:
    """Descriptor file contents: the real one with fields edited, any JSON, any bytes."""
    real = {**descriptor, "snapshot_id": OTHER.snapshot_id}

    def edit(changes: list) -> bytes:
        obj = dict(real)
        for kind, key, value in changes:
            if kind == "set":
                obj[key] = value
            elif kind == "delete":
                obj.pop(key, None)
            else:
                obj[f"x{key}"] = value
        return render(obj).encode()

    change = st.tuples(
        st.sampled_from(["set", "set", "delete", "add"]),
        st.sampled_from(sorted(real)),
        hostile_json,
    )
    return (
        st.lists(change, min_size=0, max_size=3).map(edit)
        | hostile_json.map(lambda v: render(v).encode())
        | st.binary(max_size=64)
        | st.tuples(st.integers(0, 40), st.sampled_from(INVALID_UTF8)).map(
            lambda t: (lambda b: b[: t[0]] + t[1] + b[t[0] :])(render(real).encode())
        )
    )


@fuzz(250)
@given(st.data())
@example(None)  # the real descriptor, renamed
def test_a_broken_index_entry_never_breaks_the_store(shm, data):
    store, root, good, descriptor = shm
    content = (
        render({**descriptor, "snapshot_id": OTHER.snapshot_id}).encode()
        if data is None
        else data.draw(entries(descriptor))
    )
    check_store_with_entry(store, root, good, content)


@pytest.mark.parametrize(
    "content",
    [
        RAW_JSON[2].encode(),  # finding 10: 5000-deep nesting: RecursionError out of lookup()
        b"[]",  # not an object: TypeError out of open()
        b"5",
        render({"snapshot_id": OTHER.snapshot_id}).encode(),
    ],
)
def test_broken_index_entries_regressions(shm, content):
    store, root, good, _ = shm
    check_store_with_entry(store, root, good, content)


def check_store_with_entry(store, root, good, content: bytes) -> None:
    path = store._descriptor_path(OTHER)
    with open(path, "wb") as f:
        f.write(content)
    attached = ShmStore("fuzz", create=False, shm_root=root)  # a fresh process's view: no cache
    try:
        match = attached.lookup(KEY, CHAIN)  # the scheduler's hot path: never raises
        assert match is not None and match.num_blocks == len(CHAIN)
        assert match.ref in (good, OTHER)
        infos = attached.list(KEY)
        assert good in [i.ref for i in infos]
        for ref in (good, OTHER):
            try:
                view = attached.open(ref)
            except OPEN_ERRORS:
                assert ref == OTHER
                continue
            assert view.header.snapshot_id == ref.snapshot_id
            view.close()
        with attached.reserve(4096) as r:  # reclaims what it cannot read
            r.abort()
    finally:
        attached.close()
        if os.path.exists(path):
            os.unlink(path)


@fuzz(200)
@given(hostile_json)
@example(RAW_JSON[2])
def test_descriptor_from_any_json_is_checked_or_refused(value):
    if isinstance(value, str) and len(value) > 1000:
        value = render(value)  # a raw text: as json.load would see it
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return
    try:
        d = ShmDescriptor.from_json(value)
    except (ValueError, TypeError):
        return
    assert all(type(v) is int and v >= 0 for v in (d.offset, d.length, d.num_blocks, d.pid))
    assert isinstance(d.snapshot_id, str) and isinstance(d.namespace_key, str)
    assert type(d.created_unix) in (int, float)
    assert isinstance(d.block_hashes, list) and all(isinstance(h, str) for h in d.block_hashes)


@fuzz(150)
@given(st.one_of(hostile_json.map(lambda v: render(v).encode()), st.binary(max_size=40)))
@example(RAW_JSON[2].encode())
@example(b"[]")  # finding 11: meta.json not an object: AttributeError ('list' has no .get)
def test_attaching_to_a_store_with_a_broken_meta_json(value):
    with tempfile.TemporaryDirectory(prefix="thaw-fuzz-meta-") as root:
        store = ShmStore("meta", 8192, create=True, shm_root=root)
        try:
            with open(os.path.join(store.path, "meta.json"), "wb") as f:
                f.write(value)
            try:
                ShmStore("meta", create=False, shm_root=root).close()
            except (ValueError, OSError):
                pass
        finally:
            store.close()


@fuzz(150)
@given(
    json_values.map(lambda v: render(v).encode()) | st.sampled_from([RAW_JSON[2].encode(), b"\xff"])
)
def test_a_broken_reservation_record_is_reclaimed(shm, content):
    store, root, _, _ = shm
    path = os.path.join(store.path, "reservations", "broken.json")
    with open(path, "wb") as f:
        f.write(content)
    try:
        with store.reserve(4096) as r:
            r.abort()
        assert not os.path.exists(path) or _alive_record(content)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _alive_record(content: bytes) -> bool:
    """A record that names a live process (this one) is kept, whatever else it says."""
    try:
        r = json.loads(content)
        return int(r["pid"]) == os.getpid()
    except Exception:  # noqa: BLE001 - unreadable: must have been reclaimed
        return False


@pytest.mark.parametrize(
    "content", [RAW_JSON[2].encode(), b"[]", b'{"owner_pid": "x"}', b"\xff", b""]
)
def test_creating_a_store_next_to_a_broken_one(content):
    """Creating a store first removes stores of dead creators (remove_stale, which reads every
    thaw-* meta.json under the root): a broken one is kept, never an error."""
    with tempfile.TemporaryDirectory(prefix="thaw-fuzz-stale-") as root:
        os.makedirs(os.path.join(root, "thaw-broken"))
        with open(os.path.join(root, "thaw-broken", "meta.json"), "wb") as f:
            f.write(content)
        ShmStore("new", 8192, create=True, shm_root=root).close()
        assert os.path.isdir(os.path.join(root, "thaw-broken"))
