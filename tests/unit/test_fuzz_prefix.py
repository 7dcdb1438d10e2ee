"""Fuzzing PrefixHandle (thaw_agents_core/fork/prefix.py) on what it reads from outside: its JSON
(LangGraph checkpoints, other processes) and saved ``.thawkv`` files (``PrefixHandle.load``).

Documented:

- ``PrefixHandle.from_json`` returns a handle whose every field has its declared type (token ids
  in [0, 2**31), ``0 <= num_snapshot_tokens <= len(prefix_token_ids)``), or raises ``ValueError``;
  ``from_json(to_json(h)) == h``, also through JSON text.
- ``PrefixHandle.load`` validates the file (header, every chunk CRC, the namespace when given):
  a corrupted file raises ``SnapshotError`` and publishes nothing; what it does publish holds
  exactly the original tokens and KV bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.snapshot.chunks import check_chunks
from thaw_agents_core.snapshot.errors import (
    SnapshotError,
    SnapshotFormatError,
    SnapshotMismatchError,
)
from thaw_agents_core.snapshot.format import MAX_EXTRA_DEPTH, json_nesting
from thaw_agents_core.snapshot.io import build_snapshot
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.file import FileStore

try:
    from .fuzz_profiles import FUZZ_TIMEOUT, RAW_JSON, Raw, fuzz, hostile_json, json_values, render
except ImportError:  # tests/unit is not a package: pytest put it on sys.path
    from fuzz_profiles import FUZZ_TIMEOUT, RAW_JSON, Raw, fuzz, hostile_json, json_values, render

pytestmark = FUZZ_TIMEOUT

HEX = "0123456789abcdef"
NS = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
FIELDS = (
    "snapshot_id",
    "namespace_key",
    "namespace",
    "store",
    "prefix_token_ids",
    "num_snapshot_tokens",
    "model_name",
    "prefix_text",
    "extra",
)


@st.composite
def handles(draw) -> PrefixHandle:
    tokens = draw(st.lists(st.integers(0, 2**31 - 1), max_size=40))
    return PrefixHandle(
        snapshot_id=draw(st.text(HEX, min_size=8, max_size=64)),
        namespace_key=NS.key(),
        namespace=NS.to_json(),
        store=draw(st.sampled_from(["shm://thaw-auto", "/tmp/store", "file:///x"])),
        prefix_token_ids=tokens,
        num_snapshot_tokens=draw(st.integers(0, len(tokens))),
        model_name=draw(st.text(max_size=10)),
        prefix_text=draw(st.text(max_size=20)),
        extra=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    )


def well_typed(h: PrefixHandle) -> None:
    assert all(
        isinstance(getattr(h, n), str)
        for n in ("snapshot_id", "namespace_key", "store", "model_name", "prefix_text")
    )
    assert isinstance(h.namespace, dict) and isinstance(h.extra, dict)
    assert isinstance(h.prefix_token_ids, list)
    assert all(type(t) is int and 0 <= t < 2**31 for t in h.prefix_token_ids)
    assert type(h.num_snapshot_tokens) is int and 0 <= h.num_snapshot_tokens <= len(
        h.prefix_token_ids
    )


@fuzz(300)
@given(handles())
def test_handles_round_trip(h):
    assert PrefixHandle.from_json(h.to_json()) == h
    assert PrefixHandle.from_json(json.dumps(h.to_json())) == h
    well_typed(PrefixHandle.from_json(json.dumps(h.to_json())))


@fuzz(300)
@given(handles(), st.data())
@example(
    PrefixHandle("0123456789abcdef", NS.key(), NS.to_json(), "/s", [1, 2], 2), None
)  # no edits: a real handle
def test_from_json_of_edited_handles(h, data):
    """A real handle's JSON with fields replaced by any JSON (wrong types, huge or negative
    numbers, raw texts), removed or added: a well-typed handle or a ValueError."""
    obj = h.to_json()
    if data is not None:
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["set", "set", "delete", "add"]))
            if kind == "set":
                obj[data.draw(st.sampled_from(FIELDS))] = data.draw(hostile_json)
            elif kind == "delete" and obj:
                del obj[data.draw(st.sampled_from(sorted(obj)))]
            else:
                obj[data.draw(st.text(max_size=8))] = data.draw(json_values)
    for source in (render(obj), obj if not any(isinstance(v, Raw) for v in obj.values()) else None):
        if source is None:
            continue
        try:
            got = PrefixHandle.from_json(source)
        except ValueError:
            continue
        well_typed(got)


@fuzz(300)
@given(hostile_json)
@example(Raw(RAW_JSON[2]))  # 5000-deep nesting: RecursionError before the fix
@example([])  # finding 8: not an object: TypeError ("argument after ** must be a mapping")
@example({"snapshot_id": 1})  # finding 8: missing fields: TypeError
@example(
    {
        **json.loads(
            json.dumps(
                PrefixHandle("0123456789abcdef", NS.key(), NS.to_json(), "/s", [1, 2], 2).to_json()
            )
        ),
        "prefix_token_ids": "abc",
    }
)  # finding 8: accepted with a str for the token ids
@example(
    {
        **json.loads(
            json.dumps(
                PrefixHandle("0123456789abcdef", NS.key(), NS.to_json(), "/s", [1, 2], 2).to_json()
            )
        ),
        "num_snapshot_tokens": 3,
    }
)  # more snapshot tokens than the prefix has
def test_from_json_of_anything_is_a_handle_or_a_value_error(value):
    for source in (render(value), value):
        if isinstance(source, Raw):
            continue
        try:
            got = PrefixHandle.from_json(source)
        except ValueError:
            continue
        well_typed(got)


# -- PrefixHandle.load: saved files -------------------------------------------------------------

TOKENS = list(range(100, 112))
PAYLOAD = bytes(i % 251 for i in range(192))
PRISTINE = bytes(
    build_snapshot(
        NS,
        TOKENS,
        64,
        PAYLOAD,
        blocks_per_chunk=2,
        snapshot_id="0123456789abcdef",
        created_unix=1700000000,
    )
)


@pytest.fixture(scope="module")
def scratch_dir():
    with tempfile.TemporaryDirectory(prefix="thaw-fuzz-prefix-") as d:
        yield d


@fuzz(250)
@given(st.data())
def test_load_publishes_only_intact_snapshots(scratch_dir, data):
    kind = data.draw(st.sampled_from(["flip", "flip", "burst", "truncate", "extend", "none"]))
    out = bytearray(PRISTINE)
    if kind == "flip":
        bit = data.draw(st.integers(0, 8 * len(out) - 1))
        out[bit // 8] ^= 1 << (bit % 8)
    elif kind == "burst":
        at = data.draw(st.integers(0, len(out) - 4))
        out[at : at + 4] = bytes(
            a ^ b
            for a, b in zip(
                out[at : at + 4], struct.pack("<I", data.draw(st.integers(1, 2**32 - 1)))
            )
        )
    elif kind == "truncate":
        del out[data.draw(st.integers(0, len(out) - 1)) :]
    elif kind == "extend":
        out += data.draw(st.binary(min_size=1, max_size=32))
    expect = data.draw(st.sampled_from([None, NS]))
    root = os.path.join(scratch_dir, uuid.uuid4().hex[:8])
    src = os.path.join(root, "saved.thawkv")
    os.makedirs(root)
    with open(src, "wb") as f:
        f.write(out)
    store = FileStore(os.path.join(root, "store"))
    try:
        try:
            handle = PrefixHandle.load(src, store, store_url=store.root, expect_namespace=expect)
        except SnapshotError as e:
            assert kind != "none"
            assert expect is not None or not isinstance(e, SnapshotMismatchError)
            assert not any(
                f.endswith(".thawkv") for _, _, files in os.walk(store.root) for f in files
            )
            return
        assert handle.prefix_token_ids == TOKENS and handle.num_snapshot_tokens == len(TOKENS)
        with store.open(handle.ref) as view:
            check_chunks(view)
            assert bytes(view.payload) == PAYLOAD and view.header.token_ids == TOKENS
        well_typed(PrefixHandle.from_json(json.dumps(handle.to_json())))
    finally:
        store.close()
        shutil.rmtree(root)


def nested(depth: int) -> dict:
    """``extra`` that nests ``depth`` containers deep (itself included), dicts and lists in turn."""
    value = None
    for i in range(depth - 1):
        value = {"a": value} if i % 2 else [value]
    return {"deep": value}


@pytest.mark.parametrize(
    "depth", [1, 2, 40, MAX_EXTRA_DEPTH, MAX_EXTRA_DEPTH + 1, 300, 500, 900, 5000]
)
def test_a_loaded_handle_always_serialises(scratch_dir, depth):
    """Finding 9: ``extra`` nested 500 deep in a saved file was accepted by the parser and by
    PrefixHandle.load, then handle.to_json() (dataclasses.asdict) raised RecursionError, as would
    any checkpointer. Now: refused by the parser past MAX_EXTRA_DEPTH, fine up to it. Plain
    pytest, not hypothesis: hypothesis raises the recursion limit while it runs a test."""
    assert json_nesting(nested(depth)) == min(depth, MAX_EXTRA_DEPTH + 1)
    body = json.loads(PRISTINE[16 : 16 + struct.unpack_from("<Q", PRISTINE, 8)[0]])
    body["extra"] = nested(depth)
    text = json.dumps(body, separators=(",", ":")).encode() if depth < 900 else render_deep(body)
    prefix = b"THAWKV01" + struct.pack("<Q", len(text)) + text
    data = prefix + bytes(-len(prefix) % 4096) + PAYLOAD
    root = os.path.join(scratch_dir, uuid.uuid4().hex[:8])
    os.makedirs(root)
    src = os.path.join(root, "saved.thawkv")
    with open(src, "wb") as f:
        f.write(data)
    store = FileStore(os.path.join(root, "store"))
    try:
        if depth > MAX_EXTRA_DEPTH:
            with pytest.raises(SnapshotFormatError):
                PrefixHandle.load(src, store, store_url=store.root)
            with pytest.raises(ValueError, match="MAX_EXTRA_DEPTH"):
                build_snapshot(NS, TOKENS, 64, PAYLOAD, extra=nested(depth))
            return
        handle = PrefixHandle.load(src, store, store_url=store.root)
        assert PrefixHandle.from_json(json.dumps(handle.to_json())) == handle
    finally:
        store.close()
        shutil.rmtree(root)


def render_deep(body: dict) -> bytes:
    """json.dumps of a header whose extra is too deep for json.dumps itself."""
    extra = body.pop("extra")
    depth = json_nesting(extra, 10**6)
    deep = "".join('{"a":' if i % 2 else "[" for i in range(depth - 2))
    close = "".join("}" if i % 2 else "]" for i in reversed(range(depth - 2)))
    text = (
        json.dumps(body, separators=(",", ":"))[:-1]
        + ',"extra":{"deep":'
        + deep
        + "null"
        + close
        + "}}"
    )
    return text.encode()
