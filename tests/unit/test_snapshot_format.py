"""The .thawkv format: golden bytes, round trips and exact error messages.

(That another process hashes blocks the same: tests/integration/test_snapshot_format_processes.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import google_crc32c
import pytest

from thaw_agents_core.snapshot.block_hashes import HASH_ALGO, block_hash_chain, root_hash
from thaw_agents_core.snapshot.chunks import (
    check_chunks,
    chunk_byte_range,
    covering_byte_range,
    verify_chunks,
)
from thaw_agents_core.snapshot.errors import (
    SnapshotChecksumError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotMismatchError,
)
from thaw_agents_core.snapshot.format import (
    MAGIC,
    encode_header,
    parse_snapshot,
    payload_offset_for,
)
from thaw_agents_core.snapshot.framing import MAX_HEADER_BYTES
from thaw_agents_core.snapshot.io import (
    build_snapshot,
    open_snapshot_file,
    plan_snapshot,
    write_snapshot_file,
)
from thaw_agents_core.snapshot.namespace import Namespace

NS = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
TOKENS = list(range(100, 112))  # 3 blocks of 4
PAYLOAD = bytes(i % 251 for i in range(3 * 64))  # block_bytes 64
SID = "0123456789abcdef0123456789abcdef"

GOLDEN_HEADER = (
    '{"format":"thawkv","version":1,"snapshot_id":"0123456789abcdef0123456789abcdef",'
    '"namespace":{"model_fingerprint":"tiny-model","weights_version":"w1","dtype":"float32",'
    '"kv_cache_dtype":"auto","layout":"cpu","block_size":4,"num_layers":2,"page_shape":[1,4,2],'
    '"vllm_version":"0.32.0","hash_algo":"sha256-chain-v1"},"num_tokens":12,"block_bytes":64,'
    '"payload_bytes":192,"blocks_per_chunk":2,"hash_salt":"","created_unix":1700000000,"extra":{},'
    '"chunk_crc32c":["30d9c515","d50d57bf"],'
    '"block_hashes":["fcf3b0d99fd378dba996155f6e7b88638e64bf1b399710dc798e8d9a2919a299",'
    '"33b822c9755737c8215e2cf53c4e7cf421f59297b823abe4657361bc4022d0c8",'
    '"e1e93c78cdf75311592bfa4564a7ea70bd0da3ba998a321ed632c617e0ecaf24"],'
    '"token_ids":[100,101,102,103,104,105,106,107,108,109,110,111]}'
)
HEADER_LEN = len(GOLDEN_HEADER)  # 757


def tiny(**kw) -> bytearray:
    args = dict(blocks_per_chunk=2, snapshot_id=SID, created_unix=1700000000)
    args.update(kw)
    return build_snapshot(NS, TOKENS, 64, PAYLOAD, **args)


def header_obj() -> dict:
    return json.loads(GOLDEN_HEADER)


def raw(header: dict | bytes, payload: bytes = PAYLOAD) -> bytes:
    """A snapshot file with an arbitrary header, assembled by hand like a third-party writer."""
    body = (
        header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    )
    prefix = MAGIC + struct.pack("<Q", len(body)) + body
    return prefix + bytes(-len(prefix) % 4096) + payload


def error(buf, **kw) -> str:
    with pytest.raises(SnapshotError) as e:
        parse_snapshot(buf, **kw)
    return str(e.value)


# -- golden bytes -------------------------------------------------------------------------


def test_golden_bytes():
    data = tiny()
    assert data[:8] == b"THAWKV01"
    assert struct.unpack_from("<Q", data, 8) == (757,) and HEADER_LEN == 757
    assert data[16 : 16 + HEADER_LEN].decode() == GOLDEN_HEADER
    assert data[16 + HEADER_LEN : 4096] == bytes(4096 - 16 - HEADER_LEN)  # zero padding
    assert data[4096:] == PAYLOAD and len(data) == 4096 + 192
    assert (
        hashlib.sha256(data).hexdigest()
        == "29013f26a7355fde1a7d2bca9999a23db874794053c89142ea8b4925086b8954"
    )
    assert NS.key() == "64e86335ae5a296c2f094491f5bd0c21"


def test_golden_values_recomputed_independently():
    h0 = hashlib.sha256(
        hashlib.sha256(b"thaw-kv/1\0").digest() + struct.pack("<4i", 100, 101, 102, 103)
    )
    assert h0.hexdigest() == header_obj()["block_hashes"][0]
    assert f"{google_crc32c.value(PAYLOAD[:128]):08x}" == "30d9c515"  # chunk 0: blocks 0-1
    assert f"{google_crc32c.value(PAYLOAD[128:]):08x}" == "d50d57bf"  # chunk 1: block 2 (short)


def test_third_party_reader_from_the_docstring():
    data = bytes(tiny())
    assert data[:8] == b"THAWKV01"
    (header_len,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + header_len])
    payload_offset = (16 + header_len + 4095) // 4096 * 4096
    payload = data[payload_offset : payload_offset + header["payload_bytes"]]
    bb = header["block_bytes"]
    assert payload[2 * bb : 3 * bb] == PAYLOAD[128:192]


@pytest.mark.parametrize("num_tokens", [4, 1020, 1024])
def test_payload_offset_is_4096_aligned(num_tokens):
    data = build_snapshot(NS, list(range(num_tokens)), 8, bytes(num_tokens // 4 * 8))
    view = parse_snapshot(data)
    assert view.payload_offset % 4096 == 0
    assert (
        view.payload_offset
        == payload_offset_for(view.header)
        >= 16 + struct.unpack_from("<Q", data, 8)[0]
    )
    assert len(encode_header(view.header)) == view.payload_offset


def test_round_trip():
    view = parse_snapshot(tiny(extra={"note": "héllo"}), expect_namespace=NS)
    h = view.header
    assert (h.snapshot_id, h.namespace, h.token_ids, h.extra) == (
        SID,
        NS,
        TOKENS,
        {"note": "héllo"},
    )
    assert (h.num_blocks, h.num_tokens, h.block_bytes, h.payload_bytes, h.num_chunks) == (
        3,
        12,
        64,
        192,
        2,
    )
    assert h.block_hashes == block_hash_chain(TOKENS, 4)
    assert bytes(view.payload) == PAYLOAD and bytes(view.blocks(2)) == PAYLOAD[:128]
    assert verify_chunks(view) == []
    assert Namespace.from_json(NS.to_json()) == NS


def test_two_phase_plan_matches_one_shot():
    plan = plan_snapshot(
        NS, TOKENS, 64, blocks_per_chunk=2, snapshot_id=SID, created_unix=1700000000
    )
    assert (plan.payload_offset, plan.total_bytes) == (4096, 4096 + 192)
    dest = bytearray(plan.total_bytes + 100)  # a larger region, as in a shared-memory arena
    plan.payload_view(dest)[:] = PAYLOAD
    crcs = [google_crc32c.value(PAYLOAD[:128]), google_crc32c.value(PAYLOAD[128:])]
    assert plan.finish(dest, chunk_crcs=crcs).chunk_crc32c == crcs  # as a GPU would pass them
    assert dest[: plan.total_bytes] == tiny()
    with pytest.raises(ValueError, match=r"need 2 chunk CRCs in \[0, 2\*\*32\), got 1"):
        plan.finish(dest, chunk_crcs=[1])
    with pytest.raises(
        ValueError,
        match="destination must be a writable buffer of at least 4288 bytes, got 10 bytes",
    ):
        plan.finish(bytearray(10))


def test_build_errors():
    with pytest.raises(ValueError) as e:
        build_snapshot(NS, list(range(10)), 64, bytes(128))
    assert str(e.value) == (
        "token_ids has 10 tokens, not a positive multiple of block_size 4: pass only the full blocks (token_ids[:8])"
    )
    with pytest.raises(ValueError) as e:
        build_snapshot(NS, TOKENS, 64, bytes(100))
    assert str(e.value) == "payload is 100 bytes, expected num_blocks * block_bytes = 3 * 64 = 192"
    with pytest.raises(
        ValueError, match="namespace field 'block_size' must be a positive int, got 0"
    ):
        Namespace("m", "w", "f", "a", "cpu", 0, 1, (1,), "v")


# -- block hashes -------------------------------------------------------------------------


def test_block_hash_chain_properties():
    a = block_hash_chain(list(range(10)), 4)
    assert len(a) == 2 and all(len(h) == 32 for h in a)  # the partial block is not hashed
    assert block_hash_chain(list(range(8)) + [99, 98], 4) == a
    b = block_hash_chain([0, 1, 2, 3, 4, 5, 6, 7000], 4)
    assert b[0] == a[0] and b[1] != a[1]
    c = block_hash_chain([1, 1, 2, 3, 4, 5, 6, 7], 4)
    assert c[1] != a[1]  # chained: a change in block 0 changes every later hash
    assert block_hash_chain(list(range(8)), 4, salt=b"x")[0] != a[0]
    assert root_hash() == hashlib.sha256(b"thaw-kv/1\0").digest() and HASH_ALGO == "sha256-chain-v1"
    with pytest.raises(ValueError, match=r"token id -1 is outside \[0, 2147483647\]"):
        block_hash_chain([-1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        block_hash_chain([1], 0)


# -- validation errors --------------------------------------------------------------------

_PAD_END = 4096
_END = 4096 + 192


@pytest.mark.parametrize(
    "cut, message",
    [
        (0, "truncated snapshot: 0 bytes, shorter than the 16-byte prefix (magic + header_len)"),
        (7, "truncated snapshot: 7 bytes, shorter than the 16-byte prefix (magic + header_len)"),
        (15, "truncated snapshot: 15 bytes, shorter than the 16-byte prefix (magic + header_len)"),
        (16, "truncated snapshot: header needs bytes [16, 773) but the buffer has 16 bytes"),
        (772, "truncated snapshot: header needs bytes [16, 773) but the buffer has 772 bytes"),
        (
            773,
            "truncated snapshot: payload needs bytes [4096, 4288) but the buffer has 773 bytes (3515 missing)",
        ),
        (
            4096,
            "truncated snapshot: payload needs bytes [4096, 4288) but the buffer has 4096 bytes (192 missing)",
        ),
        (
            4287,
            "truncated snapshot: payload needs bytes [4096, 4288) but the buffer has 4287 bytes (1 missing)",
        ),
    ],
)
def test_truncated(cut, message):
    data = bytes(tiny())
    with pytest.raises(SnapshotFormatError) as e:
        parse_snapshot(data[:cut])
    assert str(e.value) == message


def test_longer_buffer_is_fine():
    view = parse_snapshot(bytes(tiny()) + b"\xff" * 5000)
    assert view.total_bytes == _END and bytes(view.payload) == PAYLOAD


def test_bad_magic_and_header_len():
    data = tiny()
    data[:8] = b"PK\x03\x04zipx"
    assert (
        error(data)
        == "bad magic b'PK\\x03\\x04zipx': not a .thawkv snapshot (expected b'THAWKV01')"
    )
    data = tiny()
    data[8:16] = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    assert error(data) == (
        "header_len 16777217 exceeds the 16777216-byte cap (MAX_HEADER_BYTES): corrupt file"
    )
    data[8:16] = struct.pack("<Q", 2**64 - 1)
    assert "header_len 18446744073709551615 exceeds" in error(data)


def test_non_json_and_non_object_headers():
    assert (
        error(raw(b"not json"))
        == "header is not valid UTF-8 JSON: Expecting value: line 1 column 1 (char 0)"
    )
    assert error(raw(b'{"a":\xff}')).startswith(
        "header is not valid UTF-8 JSON: 'utf-8' codec can't decode"
    )
    assert error(raw(b"[1,2]")) == "header must be a JSON object, got list"


def test_nonzero_padding():
    data = tiny()
    data[4000] = 1
    assert error(data) == "non-zero padding before payload_offset 4096: the file is corrupt"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.pop("block_bytes"), "header is missing required field(s): block_bytes"),
        (
            lambda h: [h.pop("token_ids"), h.pop("format")],
            "header is missing required field(s): format, token_ids",
        ),
        (
            lambda h: h.update(surprise=1),
            "header has unknown field(s): surprise (custom data goes under 'extra')",
        ),
        (lambda h: h.update(format="npz"), "header field 'format' is 'npz', expected 'thawkv'"),
        (
            lambda h: h.update(version=2),
            "unsupported snapshot version 2: this reader supports version 1",
        ),
        (
            lambda h: h.update(version=True),
            "unsupported snapshot version True: this reader supports version 1",
        ),
        (
            lambda h: h.update(num_tokens="12"),
            "header field 'num_tokens' must be a non-negative int, got '12'",
        ),
        (
            lambda h: h.update(block_bytes=-64),
            "header field 'block_bytes' must be a non-negative int, got -64",
        ),
        (
            lambda h: h.update(block_bytes=1.5),
            "header field 'block_bytes' must be a non-negative int, got 1.5",
        ),
        (
            lambda h: h.update(blocks_per_chunk=0),
            "header field 'blocks_per_chunk' must be a positive int, got 0",
        ),
        (
            lambda h: h.update(snapshot_id="../etc"),
            "header field 'snapshot_id' must be 8-64 lowercase hex chars, got '../etc'",
        ),
        (lambda h: h.update(extra=[]), "header field 'extra' must be an object, got []"),
        (
            lambda h: h.update(created_unix=-1),
            "header field 'created_unix' must be a non-negative number, got -1",
        ),
        (lambda h: h.update(token_ids="x"), "header field 'token_ids' must be a list, got 'x'"),
        (
            lambda h: h["token_ids"].__setitem__(3, True),
            "header field 'token_ids' must be a list of ints in [0, 2**31)",
        ),
        (
            lambda h: h["token_ids"].__setitem__(3, 2**31),
            "header field 'token_ids' must be a list of ints in [0, 2**31)",
        ),
        (
            lambda h: h["namespace"].pop("dtype"),
            "namespace fields do not match: missing ['dtype'], unknown []",
        ),
        (
            lambda h: h["namespace"].update(block_size="4"),
            "namespace field 'block_size' must be a positive int, got '4'",
        ),
        (
            lambda h: h["namespace"].update(hash_algo="xxhash"),
            "namespace.hash_algo 'xxhash' is not supported: this reader verifies 'sha256-chain-v1'",
        ),
        (
            lambda h: h.update(num_tokens=8),
            "header field 'num_tokens' is 8 but 'token_ids' has 12 ids",
        ),
        (
            lambda h: [h.update(num_tokens=11), h["token_ids"].pop()],
            "num_tokens 11 is not a multiple of block_size 4: a snapshot covers whole blocks only",
        ),
        (
            lambda h: h.update(num_tokens=0, token_ids=[]),
            "snapshot covers no block (num_tokens is 0)",
        ),
        (
            lambda h: h.update(payload_bytes=191),
            "header field 'payload_bytes' is 191, expected num_blocks * block_bytes = 3 * 64 = 192",
        ),
        (
            lambda h: h["block_hashes"].pop(),
            "'block_hashes' has 2 entries, expected one per block (3)",
        ),
        (
            lambda h: h["block_hashes"].__setitem__(1, "AB" * 32),
            "block_hashes[1] must be 64 lowercase hex chars, got 'ABABABABABABABABABABABABABABABABABABABABABABABABABABABAB...",
        ),
        (
            lambda h: h["chunk_crc32c"].append("00000000"),
            "'chunk_crc32c' has 3 entries, expected ceil(3 / 2) = 2",
        ),
        (
            lambda h: h["chunk_crc32c"].__setitem__(0, "30d9c5"),
            "chunk_crc32c[0] must be 8 lowercase hex chars, got '30d9c5'",
        ),
        (
            lambda h: h["token_ids"].__setitem__(5, 7),
            "block_hashes[1] does not match the hash of token_ids (block 1 of 3): the header is corrupt",
        ),
        (
            lambda h: h.update(hash_salt="00"),
            "block_hashes[0] does not match the hash of token_ids (block 0 of 3): the header is corrupt",
        ),
    ],
)
def test_bad_header_fields(edit, message):
    h = header_obj()
    edit(h)
    with pytest.raises(SnapshotFormatError) as e:
        parse_snapshot(raw(h))
    assert str(e.value) == message


def test_hand_built_file_equals_ours():
    assert raw(header_obj()) == tiny()


def test_flipped_payload_byte_is_found_in_its_chunk():
    data = tiny()
    data[4096 + 130] ^= 0x01  # block 2 -> chunk 1
    view = parse_snapshot(data)
    assert verify_chunks(view) == [1]
    assert verify_chunks(view, num_blocks=2) == []  # a 2-block load only needs chunk 0
    with pytest.raises(SnapshotChecksumError) as e:
        check_chunks(view)
    assert str(e.value) == (
        "CRC32C mismatch in chunk(s) [1] of 2: the payload is corrupt or was overwritten while being read"
    )
    data[4096] ^= 0x80
    assert verify_chunks(parse_snapshot(data)) == [0, 1]


def test_chunk_ranges():
    h = parse_snapshot(tiny()).header
    assert [chunk_byte_range(h, i) for i in range(2)] == [(0, 128), (128, 192)]
    assert [covering_byte_range(h, k) for k in range(4)] == [(0, 0), (0, 128), (0, 128), (0, 192)]
    with pytest.raises(ValueError, match=r"num_blocks 4 outside \[0, 3\]"):
        covering_byte_range(h, 4)


def test_namespace_mismatch_names_every_field():
    engine = Namespace(
        "tiny-model", "w2", "float32", "auto", "flash", 16, 2, (2, 16, 1, 8), "0.32.0"
    )
    assert error(tiny(), expect_namespace=engine) == (
        "snapshot namespace does not match this engine:\n"
        "  weights_version: snapshot has 'w1', this engine has 'w2'\n"
        "  layout: snapshot has 'cpu', this engine has 'flash'\n"
        "  block_size: snapshot has 4, this engine has 16\n"
        "  page_shape: snapshot has (1, 4, 2), this engine has (2, 16, 1, 8)"
    )
    with pytest.raises(SnapshotMismatchError) as e:
        parse_snapshot(tiny(), expect_namespace=engine)
    assert len(e.value.mismatches) == 4 and isinstance(e.value, ValueError)


def test_namespace_key_changes_with_every_field():
    keys = {NS.key()}
    for name, value in [("model_fingerprint", "x"), ("weights_version", "x"), ("dtype", "bfloat16"),
                        ("kv_cache_dtype", "fp8"), ("layout", "flash"), ("block_size", 16),
                        ("num_layers", 3), ("page_shape", (1, 4, 3)), ("vllm_version", "0.26.0"),
                        ("hash_algo", "x")]:  # fmt: skip
        keys.add(Namespace(**{**NS.to_json(), name: value}).key())
    assert len(keys) == 11 and all(len(k) == 32 for k in keys)


# -- files --------------------------------------------------------------------------------


def test_write_snapshot_file_is_atomic_and_mmap_readable(tmp_path):
    path = tmp_path / "a.thawkv"
    write_snapshot_file(path, tiny())
    write_snapshot_file(path, tiny(extra={"v": 2}))  # replaces, never truncates in place
    assert os.listdir(tmp_path) == ["a.thawkv"]
    with open_snapshot_file(path, expect_namespace=NS) as view:
        assert view.header.extra == {"v": 2} and bytes(view.payload) == PAYLOAD
        assert verify_chunks(view) == []
    (tmp_path / "empty.thawkv").write_bytes(b"")
    with pytest.raises(SnapshotFormatError, match="is empty"):
        open_snapshot_file(tmp_path / "empty.thawkv")
    (tmp_path / "cut.thawkv").write_bytes(tiny()[:4100])
    with pytest.raises(SnapshotFormatError, match=r"\(188 missing\)"):
        open_snapshot_file(tmp_path / "cut.thawkv")


def test_a_header_parsed_before_is_shared_and_a_changed_one_is_parsed_again():
    buf = tiny()
    first = parse_snapshot(buf).header
    assert parse_snapshot(bytes(buf)).header is first  # same bytes: no second parse
    other = parse_snapshot(tiny(snapshot_id="f" * 32)).header
    assert other is not first and other.snapshot_id == "f" * 32
    # a header that fails a check is never kept: the same bad bytes fail again
    bad = header_obj()
    bad["block_hashes"][1] = "0" * 64
    for _ in range(2):
        assert "block_hashes" in error(raw(bad))


def test_parsed_header_cache_stays_within_its_budget():
    from thaw_agents_core.snapshot.format import _ParsedHeaders

    cache = _ParsedHeaders(budget_bytes=4000)
    header = parse_snapshot(tiny()).header
    for i in range(10):
        cache.put(bytes([i]) * 900, (header, 4096))
    assert cache._bytes <= 4000 and len(cache._by_bytes) == 4
    assert cache.get(bytes([9]) * 900) is not None and cache.get(bytes([0]) * 900) is None
    cache.put(b"x" * 1001, (header, 4096))  # over a quarter of the budget: not kept
    assert cache.get(b"x" * 1001) is None
