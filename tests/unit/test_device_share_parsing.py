"""Device shares (transport/device_share.py) and CUDA IPC entries (transport/cuda_ipc.py) on CPU.

Everything a descriptor from another process says is checked before CUDA is touched: these
tests build descriptors by hand (a real .thawkv header, a payload entry shaped like torch's
``_share_cuda_``) and check that every malformed or foreign one is refused with the format's
errors, and fuzz both parsers. The GPU path (two processes, one copy, device CRC) is
tests/integration/test_device_share.py.
"""

from __future__ import annotations

import copy
import json

import pytest
from fuzz_profiles import fuzz
from hypothesis import given
from hypothesis import strategies as st
from store_samples import BASE, NS, snapshot

from thaw_agents_core.snapshot.errors import (
    SnapshotError,
    SnapshotFormatError,
    SnapshotMismatchError,
)
from thaw_agents_core.snapshot.format import encode_header, parse_snapshot
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.transport import cuda_ipc
from thaw_agents_core.transport.device_share import KIND, open_share, parse_share

VIEW = parse_snapshot(bytes(snapshot(BASE)))
HEADER = VIEW.header


def _entry(nbytes: int, **changes) -> dict:
    entry = {
        "dtype": "uint8",
        "shape": [nbytes],
        "stride": [1],
        "storage_offset": 0,
        "device_uuid": "GPU-5f1c0d2e-0000-4000-8000-000000000000",
        "handle": [0, "ab" * 64, nbytes, 0, "2f7468772d" * 2, 0, "cd" * 64, True],
    }
    return {**entry, **changes}


def _desc(**changes) -> dict:
    desc = {
        "kind": KIND,
        "snapshot_id": HEADER.snapshot_id,
        "header": encode_header(HEADER).hex(),
        "payload": _entry(HEADER.payload_bytes),
    }
    return {**desc, **changes}


def test_a_valid_descriptor_parses_to_the_snapshot_header():
    share = parse_share(_desc(), expect_namespace=NS)
    assert share.header == HEADER
    assert share.payload.shape == (HEADER.payload_bytes,)
    assert share.payload.storage.memory_handle == b"\xab" * 64
    json.dumps(_desc())  # data only: plain JSON


def test_a_snapshot_of_another_engine_is_refused_before_any_copy():
    other = Namespace(**{**NS.to_json(), "weights_version": "w2"})
    with pytest.raises(SnapshotMismatchError, match="weights_version"):
        parse_share(_desc(), expect_namespace=other)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kind": "pickle"}, "is not 'thawkv-cuda-ipc'"),
        ({"snapshot_id": "0" * 16}, "carries the header of"),
        ({"header": "zz"}, "header's bytes in hex"),
        ({"header": encode_header(HEADER).hex()[:100]}, "truncated snapshot"),
        ({"payload": _entry(HEADER.payload_bytes - 1)}, "must be uint8"),
        ({"payload": _entry(HEADER.payload_bytes, dtype="float32")}, "past its storage"),
        (
            {
                "payload": _entry(
                    HEADER.payload_bytes, shape=[HEADER.payload_bytes // 4, 4], stride=[4, 1]
                )
            },
            "must be uint8",
        ),
        ({"payload": _entry(HEADER.payload_bytes, stride=[2])}, "past its storage"),
        ({"payload": _entry(HEADER.payload_bytes, dtype="Tensor")}, "not a torch dtype"),
        ({"payload": _entry(HEADER.payload_bytes, storage_offset=1)}, "past its storage"),
        ({"payload": _entry(HEADER.payload_bytes, handle=[0, "ab"])}, "list of 8 fields"),
        ({"payload": {"dtype": "uint8"}}, "exactly"),
    ],
)
def test_malformed_descriptors_are_format_errors(changes, message):
    with pytest.raises(SnapshotFormatError, match=message):
        parse_share(_desc(**changes), expect_namespace=NS)


def test_extra_or_missing_fields_are_refused():
    with pytest.raises(SnapshotFormatError, match="exactly"):
        parse_share({**_desc(), "pickle": "x"})
    desc = _desc()
    del desc["payload"]
    with pytest.raises(SnapshotFormatError, match="exactly"):
        parse_share(desc)


def test_a_handle_with_bad_fields_names_the_field():
    good = _entry(64)
    for index, value, field in [
        (0, -1, "device"),
        (1, "AB", "memory handle"),
        (2, True, "storage bytes"),
        (4, 7, "ref-counter handle"),
        (7, 1, "event sync"),
    ]:
        handle = list(good["handle"])
        handle[index] = value
        with pytest.raises(ValueError, match=field):
            cuda_ipc.parse_entry({**good, "handle": handle})


def test_hex_fields_take_only_the_exact_lowercase_form():
    good = _entry(64)
    for memory in ("AB" * 64, "ab " * 64, "a" * 3, " " + "ab" * 63, "ab" * 600):
        handle = list(good["handle"])
        handle[1] = memory
        with pytest.raises(ValueError, match="memory handle"):
            cuda_ipc.parse_entry({**good, "handle": handle})
    assert cuda_ipc.parse_entry(good).storage.memory_handle == bytes.fromhex("ab" * 64)


def test_a_view_past_its_storage_is_refused():
    with pytest.raises(ValueError, match="past its storage"):
        cuda_ipc.parse_entry(_entry(64, shape=[65]))
    with pytest.raises(ValueError, match="past its storage"):
        cuda_ipc.parse_entry(_entry(64, shape=[8, 8], stride=[9, 1]))
    assert cuda_ipc.parse_entry(_entry(64, shape=[0])).numel == 0


def _storage(nbytes: int) -> dict:
    entry = _entry(nbytes)
    return {"device_uuid": entry["device_uuid"], "handle": entry["handle"]}


def _view(name: str, nbytes: int, storage: int = 0, offset: int = 0) -> dict:
    return {
        "name": name,
        "dtype": "uint8",
        "shape": [nbytes],
        "stride": [1],
        "storage_offset": offset,
        "storage": storage,
    }


def test_weight_swap_views_share_one_storage_and_carry_unique_names():
    from thaw_agents_core.weights.sources import parse_cuda_ipc

    desc = {"storages": [_storage(96)], "tensors": [_view("a", 64), _view("b", 32, offset=64)]}
    handles = parse_cuda_ipc(desc)
    assert list(handles) == ["a", "b"] and handles["b"].shape == (32,)
    assert handles["a"].storage is handles["b"].storage  # opened once
    for changes, match in [
        ({"tensors": [_view("a", 64), _view("a", 32)]}, "appears twice"),
        ({"tensors": [{k: v for k, v in _view("a", 8).items() if k != "name"}]}, "needs a name"),
        ({"tensors": [{**_view("a", 8), "extra": 1}]}, "exactly"),
        ({"tensors": [_view("a", 8, storage=1)]}, "index below 1"),
        ({"tensors": [_view("a", 8, storage=True)]}, "index below 1"),
        ({"tensors": [_view("a", 8, offset=90)]}, "past its storage"),
        ({"storages": [{**_storage(96), "pickle": 1}]}, "exactly"),
        ({"tensors": {"a": _view("a", 8)}}, "must be lists"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_cuda_ipc({**desc, **changes})


def test_open_share_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        open_share(_desc(), "cpu", NS)


def test_exporting_a_cpu_tensor_is_refused():
    import torch

    with pytest.raises(ValueError, match="only CUDA tensors"):
        cuda_ipc.export_tensor(torch.zeros(4))


# ---------------------------------------------------------------------- fuzzing

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    """Every (path) to a value inside ``obj``."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


_PATHS = [p for p in _paths(_desc()) if p]


@fuzz(300)
@given(st.sampled_from(_PATHS), _JSON)
def test_fuzz_any_value_replaced_gives_a_snapshot_error_or_a_valid_share(path, value):
    desc = copy.deepcopy(_desc())
    target = desc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        share = parse_share(desc, expect_namespace=NS)
    except SnapshotError:
        return
    assert share.payload.dtype == "uint8" and share.header.payload_bytes == share.payload.numel


@fuzz(200)
@given(st.integers(0, len(encode_header(HEADER)) * 2 - 1), st.sampled_from("0123456789abcdef"))
def test_fuzz_header_hex_digits(position, digit):
    text = encode_header(HEADER).hex()
    desc = _desc(header=text[:position] + digit + text[position + 1 :])
    try:
        share = parse_share(desc, expect_namespace=NS)
    except SnapshotError:
        return
    assert share.header.snapshot_id == HEADER.snapshot_id


@fuzz(300)
@given(_JSON)
def test_fuzz_cuda_ipc_entries(obj):
    try:
        entry = cuda_ipc.parse_entry(obj)
    except ValueError:
        return
    assert entry.dtype


_HANDLES = st.lists(
    st.integers(-1, 2**65) | st.booleans() | st.sampled_from(["ab" * 64, "AB", "", "2f74"]),
    min_size=7,
    max_size=9,
)
_STORAGES = st.fixed_dictionaries({"device_uuid": st.text(max_size=8), "handle": _HANDLES})
_VIEWS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b"]),
        "dtype": st.sampled_from(["uint8", "bfloat16", "Tensor", "bogus"]),
        "shape": st.lists(st.integers(-2, 300), max_size=3),
        "stride": st.lists(st.integers(-2, 300), max_size=3),
        "storage_offset": st.integers(-2, 300),
        "storage": st.integers(-1, 2) | _JSON,
    }
)


@fuzz(300)
@given(
    st.fixed_dictionaries(
        {"storages": st.lists(_STORAGES, max_size=2), "tensors": st.lists(_VIEWS, max_size=3)}
    )
    | st.dictionaries(st.sampled_from(["storages", "tensors"]), _JSON)
)
def test_fuzz_weight_swap_descriptors(desc):
    from thaw_agents_core.weights.sources import parse_cuda_ipc

    try:
        handles = parse_cuda_ipc(desc)
    except ValueError:
        return
    for h in handles.values():  # what passed fits its storage
        item = cuda_ipc._dtype(h.dtype).itemsize
        last = h.storage_offset + sum((d - 1) * s for d, s in zip(h.shape, h.stride))
        assert h.numel == 0 or (last + 1) * item <= h.storage.storage_bytes
