"""Fuzzing the ``.thawkv`` reader: headers, chunk tables and payloads from files and other processes.

Valid snapshots come from the project's own writer (:func:`build_snapshot`, small random layouts),
then get truncated, bit-flipped, burst-corrupted, their JSON rewritten (wrong types, huge and
negative sizes, duplicate keys, non-UTF-8, raw texts such as 4301-digit ints or 5000-deep
nesting) or their header_len prefix overwritten.

The documented errors: :func:`parse_snapshot` / :func:`parse_header` /
:func:`read_snapshot_header` / :func:`open_snapshot_file` raise :class:`SnapshotError` (its
subclasses :class:`SnapshotFormatError`, :class:`SnapshotMismatchError`), :func:`check_chunks`
raises :class:`SnapshotChecksumError`; the loaders that open a store (:class:`KVTransport`,
:class:`SnapshotVerifier`) may also raise what a store's ``open`` raises: ``LookupError``
(:class:`SnapshotNotFoundError`), ``ValueError`` (FileStore: a file holding another id), which
is exactly the set the verifier catches. Nothing else may come out, and nothing may hang
(hypothesis deadline; pytest-timeout).

The property for a corrupted copy of a valid snapshot (:func:`outcome`), precisely:

1. it is **rejected** by the parser (a ``SnapshotError``), or
2. it parses, and then the chunk table still covers the payload exactly (one CRC per chunk,
   chunks contiguous from byte 0 to ``payload_bytes``, ``num_chunks = ceil(num_blocks /
   blocks_per_chunk)`` in integers) and either
   a. the chunk CRC32C check reports a bad chunk: **detected**. Both checks the code has agree
      on which: ``verify_chunks`` (PrefixHandle.load, S3) and the CPU kernel ``chunk_crc32c``
      compared by ``check_chunk_crcs``, as ``KVTransport.load`` does; or
   b. every CRC matches and the snapshot means the same KV: payload bytes (wherever the header
      now puts them), token ids, block hashes, salt, block size and block bytes all equal the
      original's: **harmless**. What may differ is only what no check can bind without a header checksum
      (the format has none): ``snapshot_id``, ``created_unix``, ``extra``, the namespace's
      descriptive fields, and ``blocks_per_chunk`` (whose CRCs then matched). A differing
      namespace is refused wherever ``expect_namespace`` is passed (SnapshotMismatchError:
      KVTransport.load and SnapshotVerifier always pass it, PrefixHandle.load when asked) and
      by FileStore's index (a file whose namespace key is not its directory's); a differing
      id by ``FileStore.open`` / ``ShmStore.open``. Measured (``--hypothesis-show-statistics``):
      about 90% of header-region flips are rejected, the rest change the namespace's strings or
      the snapshot id (or nothing: a flip that JSON decodes to the same value).

For a flip (or a <= 32-bit burst) inside the payload, 2a is certain, not probable: CRC32C
detects every error burst of at most 32 bits, so the test asserts exactly which chunks are bad.
The KV loader is fuzzed end to end on CPU (file and shared-memory stores): whatever the bytes,
it writes only the destination blocks, and only correct data into them.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass

import google_crc32c
import pytest
import torch
from hypothesis import currently_in_test_context, event, example, given
from hypothesis import strategies as st

from thaw_agents_core.connector.verifier import SnapshotVerifier
from thaw_agents_core.snapshot.block_hashes import HASH_ALGO, block_hash_chain
from thaw_agents_core.snapshot.chunks import (
    check_chunk_crcs,
    check_chunks,
    chunk_byte_range,
    chunk_range,
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
    SnapshotHeader,
    encode_header,
    parse_header,
    parse_snapshot,
)
from thaw_agents_core.snapshot.framing import MAX_HEADER_BYTES, align_up
from thaw_agents_core.snapshot.io import (
    build_snapshot,
    open_snapshot_file,
    read_snapshot_header,
)
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import SnapshotRef
from thaw_agents_core.store.file import FileStore
from thaw_agents_core.store.shm import ShmStore
from thaw_agents_core.transport.kv import KVTransport
from thaw_agents_core.transport.stream_scheduler import StreamScheduler, as_uint8_tensor
from thaw_kernels import chunk_crc32c

try:
    from .fuzz_profiles import (
        EDGE_INTS,
        FUZZ_TIMEOUT,
        INTERESTING_INTS,
        INVALID_UTF8,
        RAW_JSON,
        Pairs,
        Raw,
        fuzz,
        hostile_json,
        json_values,
        render,
    )
except ImportError:  # tests/unit is not a package: pytest put it on sys.path
    from fuzz_profiles import (
        EDGE_INTS,
        FUZZ_TIMEOUT,
        INTERESTING_INTS,
        INVALID_UTF8,
        RAW_JSON,
        Pairs,
        Raw,
        fuzz,
        hostile_json,
        json_values,
        render,
    )

pytestmark = FUZZ_TIMEOUT

LOADER_ERRORS = (SnapshotError, LookupError, ValueError)
"""What a store-backed load may raise (the verifier catches these, plus OSError)."""

# -- valid snapshots from the project's writer ---------------------------------------------------

HEX = "0123456789abcdef"
text = st.text(max_size=10) | st.text(st.characters(exclude_categories=()), max_size=4)
finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
    max_leaves=6,
)


@dataclass(frozen=True, repr=False)
class Snap:
    data: bytes
    namespace: Namespace
    header: SnapshotHeader
    payload: bytes
    payload_offset: int
    tokens: list[int]
    salt: bytes

    def __repr__(self) -> str:  # falsifying examples stay readable
        return (
            f"<Snap {len(self.data)} bytes: {self.header.num_blocks} blocks of {self.header.block_size} "
            f"tokens, {self.header.block_bytes} B, {self.header.blocks_per_chunk} per chunk>"
        )

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' printer
        p.text(repr(self))

    @property
    def header_len(self) -> int:
        return struct.unpack_from("<Q", self.data, 8)[0]

    @property
    def body(self) -> bytes:
        return self.data[16 : 16 + self.header_len]

    def header_obj(self) -> dict:
        return json.loads(self.body)


@st.composite
def snapshots(draw, max_blocks: int = 6) -> Snap:
    bs, nb = draw(st.integers(1, 8)), draw(st.integers(1, max_blocks))
    block_bytes, bpc = draw(st.integers(1, 48)), draw(st.integers(1, max_blocks + 2))
    ns = Namespace(draw(text), draw(text), draw(st.sampled_from(["float32", "bfloat16", "fp8"])),
                   draw(st.sampled_from(["auto", "fp8_e4m3"])), draw(st.sampled_from(["cpu", "flash"])),
                   bs, draw(st.integers(1, 4)), tuple(draw(st.lists(st.integers(0, 2**40), max_size=4))),
                   draw(text))  # fmt: skip
    tokens = draw(st.lists(st.integers(0, 2**31 - 1), min_size=nb * bs, max_size=nb * bs))
    payload = draw(st.binary(min_size=nb * block_bytes, max_size=nb * block_bytes))
    salt = draw(st.binary(max_size=4))
    data = bytes(build_snapshot(
        ns, tokens, block_bytes, payload, blocks_per_chunk=bpc, hash_salt=salt,
        snapshot_id=draw(st.text(HEX, min_size=8, max_size=64)),
        created_unix=draw(st.integers(0, 2**40) | st.floats(0, 4e9)),
        extra=draw(st.dictionaries(text, finite_json, max_size=3)),
    ))  # fmt: skip
    header, payload_offset = parse_header(data)
    return Snap(data, ns, header, payload, payload_offset, tokens, salt)


def assemble(body: bytes, payload: bytes, header_len: int | None = None) -> bytes:
    """A snapshot file around any header text, as a third-party writer would lay it out."""
    n = len(body) if header_len is None else header_len
    prefix = MAGIC + struct.pack("<Q", n) + body
    return prefix + bytes(align_up(len(prefix)) - len(prefix)) + payload


# -- the property ---------------------------------------------------------------------------


def loader_bad_chunks(view) -> list[int]:
    """Bad chunks as KVTransport.load finds them on CPU: the kernel's CRCs of the payload,
    compared by check_chunk_crcs (the one chunk check)."""
    h = view.header
    crcs = chunk_crc32c(as_uint8_tensor(view.payload), h.blocks_per_chunk * h.block_bytes).tolist()
    assert len(crcs) == len(h.chunk_crc32c), "a chunk of the payload has no CRC to check"
    try:
        check_chunk_crcs(h, crcs)
    except SnapshotChecksumError as e:
        return list(e.bad_chunks)
    return []


def assert_chunks_cover_payload(h: SnapshotHeader) -> None:
    n = -(-h.num_blocks // h.blocks_per_chunk)  # integer ceil: exact for any size
    assert h.num_chunks == len(h.chunk_crc32c) == n and chunk_range(h) == range(n)
    cursor = 0
    for i in range(n):
        start, end = chunk_byte_range(h, i)
        assert start == cursor < end
        cursor = end
    assert cursor == h.payload_bytes == h.num_blocks * h.block_bytes


def outcome(s: Snap, data: bytes) -> str:
    """'rejected', 'detected' or 'harmless' for a corrupted copy of ``s`` (module docstring)."""
    buf = bytearray(data)
    try:
        view = parse_snapshot(buf)
    except SnapshotError:
        assert buf == data  # the parser never writes into what it reads
        return "rejected"
    assert buf == data
    assert view.payload.obj is buf and view.payload_offset + len(view.payload) <= len(buf)
    h = view.header
    assert_chunks_cover_payload(h)
    bad = verify_chunks(view)
    assert loader_bad_chunks(view) == bad
    if bad:
        with pytest.raises(SnapshotChecksumError) as e:
            check_chunks(view)
        assert e.value.bad_chunks == bad
        return "detected"
    assert bytes(view.payload) == s.payload, "corrupted payload accepted: every CRC matched"
    assert (h.token_ids, h.block_hashes, h.hash_salt) == (s.tokens, s.header.block_hashes, s.salt)
    assert (h.block_size, h.block_bytes, h.namespace.hash_algo) == (
        s.header.block_size,
        s.header.block_bytes,
        HASH_ALGO,
    )
    changed = sorted(k for k, v in h.to_json().items() if v != s.header.to_json()[k])
    assert set(changed) <= {
        "snapshot_id",
        "created_unix",
        "extra",
        "namespace",
        "blocks_per_chunk",
        "chunk_crc32c",
    }
    assert "chunk_crc32c" not in changed or "blocks_per_chunk" in changed
    if h.namespace != s.namespace:
        with pytest.raises(SnapshotMismatchError):
            parse_snapshot(data, expect_namespace=s.namespace)
    if currently_in_test_context():  # (also called from plain, exhaustive tests)
        event(f"harmless change of {changed or 'nothing'}")
    return "harmless"


# -- round trip ------------------------------------------------------------------------------


@fuzz(300)
@given(snapshots(), st.binary(max_size=64))
def test_writer_output_parses_back_exactly(s, trailing):
    view = parse_snapshot(
        s.data + trailing, expect_namespace=s.namespace
    )  # may extend past the end
    h = view.header
    assert (h.namespace, h.token_ids, h.hash_salt) == (s.namespace, s.tokens, s.salt)
    assert h.block_hashes == block_hash_chain(s.tokens, s.namespace.block_size, s.salt)
    assert bytes(view.payload) == s.payload and view.total_bytes == len(s.data)
    step = h.blocks_per_chunk * h.block_bytes
    assert h.chunk_crc32c == [
        google_crc32c.value(s.payload[i : i + step]) for i in range(0, len(s.payload), step)
    ]
    assert_chunks_cover_payload(h)
    assert verify_chunks(view) == [] == loader_bad_chunks(view)
    assert (
        encode_header(h) == s.data[: view.payload_offset]
    )  # canonical: re-encodes to the same bytes
    assert render(json.loads(s.body)) == s.body.decode()  # render() writes what the writer writes
    assert SnapshotHeader.from_json(h.to_json()) == h


# -- truncation, bit flips, bursts -------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_dir():
    with tempfile.TemporaryDirectory(prefix="thaw-fuzz-") as d:
        yield d


@fuzz(300)
@given(snapshots(), st.data())
def test_any_truncation_is_rejected(scratch_dir, s, data):
    cut = data.draw(
        st.integers(0, len(s.data) - 1) | st.integers(max(0, s.payload_offset - 2), len(s.data) - 1)
    )
    with pytest.raises(SnapshotFormatError):
        parse_snapshot(s.data[:cut])
    path = os.path.join(scratch_dir, "cut.thawkv")
    with open(path, "wb") as f:
        f.write(s.data[:cut])
    with pytest.raises(SnapshotFormatError):
        read_snapshot_header(path)
    with pytest.raises(SnapshotFormatError):
        open_snapshot_file(path).close()


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@fuzz(400)
@given(snapshots(), st.data())
def test_bit_flip_in_header_region_is_rejected_or_harmless(s, data):
    bit = data.draw(
        st.integers(0, 8 * s.payload_offset - 1) | st.integers(0, 8 * (16 + s.header_len) - 1)
    )
    result = outcome(s, flip(s.data, bit))
    event(f"header flip: {result}")


@fuzz(300)
@given(snapshots(), st.data())
def test_bit_flip_in_payload_is_detected_in_its_chunk(s, data):
    bit = data.draw(st.integers(8 * s.payload_offset, 8 * len(s.data) - 1))
    assert outcome(s, flip(s.data, bit)) == "detected"
    chunk_bytes = s.header.blocks_per_chunk * s.header.block_bytes
    view = parse_snapshot(flip(s.data, bit))
    assert verify_chunks(view) == [(bit // 8 - s.payload_offset) // chunk_bytes]


@fuzz(300)
@given(snapshots(), st.data())
def test_bursts_in_several_chunks_are_each_detected(s, data):
    """A burst of <= 32 bits per chunk, in any chunks: exactly those chunks are bad."""
    h, out = s.header, bytearray(s.data)
    chunks = data.draw(st.sets(st.integers(0, h.num_chunks - 1), min_size=1))
    for c in chunks:
        start, end = chunk_byte_range(h, c)
        at = data.draw(st.integers(start, end - 1))
        width = min(4, end - at)
        mask = data.draw(st.integers(1, 2 ** (8 * width) - 1)).to_bytes(width, "little")
        for i, m in enumerate(mask):
            out[s.payload_offset + at + i] ^= m
    assert outcome(s, bytes(out)) == "detected"
    assert verify_chunks(parse_snapshot(out)) == sorted(chunks)


@fuzz(300)
@given(snapshots(), st.data())
def test_overwritten_header_bytes_are_rejected_or_harmless(s, data):
    """Any bytes over any part of the prefix + header + padding (not only single flips)."""
    at = data.draw(st.integers(0, s.payload_offset - 1))
    junk = data.draw(st.binary(min_size=1, max_size=16) | st.sampled_from(INVALID_UTF8))
    out = bytearray(s.data)
    end = min(at + len(junk), s.payload_offset)
    out[at:end] = junk[: end - at]
    outcome(s, bytes(out))


# -- the header's JSON rewritten -----------------------------------------------------------------

NUMERIC_PATHS = [
    ("num_tokens",),
    ("block_bytes",),
    ("payload_bytes",),
    ("blocks_per_chunk",),
    ("created_unix",),
    ("version",),
    ("namespace", "block_size"),
    ("namespace", "num_layers"),
    ("namespace", "page_shape", 0),
    ("token_ids", 0),
]


def paths_of(obj: dict) -> list[tuple]:
    """Every value's path: top-level fields, namespace fields, list elements."""
    out: list[tuple] = []
    for k, v in obj.items():
        out.append((k,))
        if isinstance(v, dict):
            out += [(k, kk) for kk in v] + [
                (k, kk, i) for kk, vv in v.items() if isinstance(vv, list) for i in range(len(vv))
            ]
        elif isinstance(v, list):
            out += [(k, i) for i in range(len(v))]
    return out


def container(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    return obj


@st.composite
def rewritten_headers(draw, s: Snap) -> tuple[bytes, int | None]:
    """(body, header_len or None): 1-3 JSON-level edits, then maybe byte edits."""
    obj: object = s.header_obj()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "add", "dup", "wrap"]))
        if not isinstance(obj, dict):
            break
        paths = paths_of(obj)
        if not paths:
            break
        if kind == "set":
            path = draw(st.sampled_from(paths))
            container(obj, path)[path[-1]] = draw(hostile_json | INTERESTING_INTS)
        elif kind == "delete":
            path = draw(
                st.sampled_from(
                    [p for p in paths if isinstance(container(obj, p), dict)] or paths[:1]
                )
            )
            del container(obj, path)[path[-1]]
        elif kind == "add":
            target = draw(st.sampled_from([obj] + [v for v in obj.values() if isinstance(v, dict)]))
            target[draw(st.text(max_size=12))] = draw(json_values)
        elif kind == "dup":  # a key twice: json.loads keeps the last, like the docstring's reader
            key = draw(st.sampled_from(list(obj)))
            other = draw(hostile_json)
            items = list(obj.items())
            items.insert(draw(st.integers(0, len(items))), (key, other))
            obj = Pairs(items)
        else:
            obj = draw(hostile_json)
    body = render(obj).encode()
    if draw(st.booleans()):  # byte-level edits: not UTF-8, NUL, BOM, random bytes
        at = draw(st.integers(0, len(body)))
        junk = draw(st.sampled_from(INVALID_UTF8) | st.binary(min_size=1, max_size=4))
        body = body[:at] + junk + body[at + draw(st.integers(0, len(junk))) :]
    header_len = None
    if draw(st.integers(0, 4)) == 0:  # a header_len prefix that lies
        header_len = draw(
            st.integers(0, 2**64 - 1)
            | st.sampled_from(
                [
                    len(body) + 1,
                    len(body) - 1,
                    len(body) + 4096,
                    MAX_HEADER_BYTES,
                    MAX_HEADER_BYTES + 1,
                    2**64 - 1,
                ]
            ).filter(lambda n: 0 <= n < 2**64)
        )
    return body, header_len


@fuzz(500)
@given(snapshots(max_blocks=4), st.data())
def test_rewritten_header_json_is_rejected_or_harmless(s, data):
    body, header_len = data.draw(rewritten_headers(s))
    outcome(s, assemble(body, s.payload, header_len))


@fuzz(300)
@given(snapshots(max_blocks=4), st.data())
def test_extreme_sizes_never_leave_payload_unchecked(s, data):
    """Numeric fields at their edges (and of the wrong number type), then the CRC list at every
    length that could fool a count (with CRCs right for the geometry the header now claims):
    anything accepted still has its whole payload under checked CRCs."""
    obj = s.header_obj()
    for path in data.draw(
        st.lists(st.sampled_from(NUMERIC_PATHS), min_size=1, max_size=3, unique=True)
    ):
        where = container(obj, path)
        if isinstance(where, dict) or path[-1] < len(where):
            where[path[-1]] = data.draw(
                INTERESTING_INTS | st.integers(-3, 2 * len(s.payload) + 3) | st.floats()
            )
    bpc, bb = obj["blocks_per_chunk"], obj["block_bytes"]
    geometry_ok = all(isinstance(v, int) and v > 0 for v in (bpc, bb))
    step = bpc * bb if geometry_ok else len(s.payload)
    right = [
        f"{google_crc32c.value(s.payload[i : i + step]):08x}"
        for i in range(0, len(s.payload), step)
    ]
    for n in sorted({0, 1, 2, len(right), len(obj["chunk_crc32c"])}):
        obj["chunk_crc32c"] = (right + ["00000000"] * n)[:n]
        outcome(s, assemble(render(obj).encode(), s.payload))


EDGE_VALUES = EDGE_INTS + [0.0, 1.0, 1.5, -0.0, float("inf"), True, None, "1", [1]]


@pytest.mark.parametrize("path", NUMERIC_PATHS, ids=lambda p: ".".join(map(str, p)))
def test_every_numeric_field_at_every_edge(path):
    """Exhaustive, not random: each numeric field of a real header at each edge value, with the
    CRC list at every length that could fool a chunk count."""
    for value in EDGE_VALUES:
        obj = GOLDEN.header_obj()
        container(obj, path)[path[-1]] = value
        for n in (0, 1, 2, 3):
            obj["chunk_crc32c"] = (
                [f"{google_crc32c.value(GOLDEN.payload):08x}"] + GOLDEN.header_obj()["chunk_crc32c"]
            )[:n]
            outcome(GOLDEN, assemble(render(obj).encode(), GOLDEN.payload))


@fuzz(300)
@given(
    st.binary(max_size=300)
    | st.binary(max_size=64).map(lambda b: MAGIC + b)
    | st.tuples(st.integers(0, 2**64 - 1), hostile_json).map(
        lambda t: MAGIC + struct.pack("<Q", t[0]) + render(t[1]).encode()
    )
)
def test_arbitrary_bytes_raise_only_snapshot_errors(buf):
    with pytest.raises(SnapshotError):
        parse_snapshot(buf)


@fuzz(300)
@given(json_values)
def test_header_from_arbitrary_json_raises_only_format_errors(value):
    try:
        h = SnapshotHeader.from_json(value)
    except SnapshotFormatError:
        return
    assert_chunks_cover_payload(h)


# -- raw JSON texts in every field: the inputs behind the findings -------------------------------


def golden() -> Snap:
    ns = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
    tokens, payload = list(range(100, 112)), bytes(i % 251 for i in range(192))
    data = bytes(
        build_snapshot(
            ns,
            tokens,
            64,
            payload,
            blocks_per_chunk=2,
            snapshot_id="0123456789abcdef",
            created_unix=1700000000,
        )
    )
    header, offset = parse_header(data)
    return Snap(data, ns, header, payload, offset, tokens, b"")


GOLDEN = golden()
FIELD_PATHS = [(k,) for k in GOLDEN.header_obj()] + [
    ("namespace", k) for k in GOLDEN.namespace.to_json()
]
BIG_INT, DEEP_ARRAY, DEEP_OBJECT = RAW_JSON[0], RAW_JSON[2], RAW_JSON[3]


@fuzz(200)
@given(snapshots(max_blocks=4), st.sampled_from(FIELD_PATHS), st.sampled_from(RAW_JSON))
@example(GOLDEN, ("token_ids",), DEEP_ARRAY)  # finding 1: RecursionError escaped parse_header
@example(GOLDEN, ("extra",), DEEP_OBJECT)
@example(GOLDEN, ("created_unix",), BIG_INT)  # finding 2: int digit limit, a bare ValueError
@example(GOLDEN, ("created_unix",), RAW_JSON[4])  # finding 4: math.isfinite(10**400): OverflowError
def test_raw_json_texts_in_every_field(s, path, raw):
    obj = s.header_obj()
    container(obj, path)[path[-1]] = Raw(raw)
    outcome(s, assemble(render(obj).encode(), s.payload))


@fuzz(100)
@given(snapshots(max_blocks=4), st.sampled_from([10**400, 2**1100, 7 * 10**308, 2**64, 2**53 + 1]))
@example(GOLDEN, 10**400)  # finding 3: float ceil(3 / 10**400) == 0 chunks, so no CRC was checked
def test_huge_blocks_per_chunk_still_has_one_checked_crc(s, bpc):
    """blocks_per_chunk past every block: one chunk, the whole payload, one CRC that is checked."""
    obj = s.header_obj()
    obj["blocks_per_chunk"] = bpc
    for crcs in ([], [f"{google_crc32c.value(s.payload):08x}"] * 2):
        obj["chunk_crc32c"] = crcs
        with pytest.raises(SnapshotFormatError, match="'chunk_crc32c' has"):
            parse_snapshot(assemble(render(obj).encode(), s.payload))
    obj["chunk_crc32c"] = [f"{google_crc32c.value(s.payload):08x}"]
    assert outcome(s, assemble(render(obj).encode(), s.payload)) == "harmless"
    corrupt = flip(assemble(render(obj).encode(), s.payload), 8 * len(s.data) - 1)
    assert outcome(s, corrupt) == "detected"


# -- the loaders: KV transport (CPU), verifier, store index ----------------------------------------

LAYERS, CACHE_BLOCKS, BS, HEADS, DIM = 2, 16, 4, 1, 2
SRC = [
    3,
    0,
    7,
    12,
    5,
    9,
    1,
]  # 7 saved blocks: chunks of 2 blocks (4, the last short), 2 copy pieces
FREE = [2, 4, 6, 8, 10, 11, 13, 14, 15]
POISON = -12345.0


class Rig:
    """A CPU KV cache, a transport over ``store`` and one saved snapshot whose stored bytes
    each example corrupts (and restores)."""

    def __init__(self, kind: str, store) -> None:
        g = torch.Generator().manual_seed(0)
        self.kind, self.store = kind, store
        self.layers = [
            torch.randn(CACHE_BLOCKS, HEADS, BS, 2 * DIM, generator=g) for _ in range(LAYERS)
        ]
        self.namespace = Namespace(
            "fuzz", "", "float32", "auto", "cpu", BS, LAYERS, (BS, HEADS, DIM), "test"
        )
        self.transport = KVTransport(
            self.layers, self.namespace, store, StreamScheduler(torch.device("cpu"))
        )
        self.transport.blocks_per_chunk = 2
        self.transport.copier.copy_chunk_bytes = 4 * self.transport.block_bytes
        self.tokens = list(range(100, 100 + len(SRC) * BS))
        self.ref, _ = self.transport.save(self.tokens, SRC)
        self.chain = block_hash_chain(self.tokens, BS)
        self.originals = [self.block(b).clone() for b in SRC]
        self.pristine = self.read()
        header, offset = parse_header(self.pristine)
        self.snap = Snap(
            self.pristine, self.namespace, header, self.pristine[offset:], offset, self.tokens, b""
        )

    def block(self, b: int) -> torch.Tensor:
        return torch.stack([t[b] for t in self.layers])

    def read(self) -> bytes:
        if self.kind == "file":
            with open(self.store.path_of(self.ref), "rb") as f:
                return f.read()
        offset, length = self.store.region_of(self.ref)
        return bytes(self.store.arena_view()[offset : offset + length])

    def write(self, data: bytes) -> None:
        if self.kind == "file":
            with open(self.store.path_of(self.ref), "wb") as f:
                f.write(data)
        else:
            offset, length = self.store.region_of(self.ref)
            assert len(data) == length
            self.store.arena_view()[offset : offset + length] = data


@pytest.fixture(scope="module", params=["file", "shm"])
def rig(request, scratch_dir):
    if request.param == "file":
        store = FileStore(os.path.join(scratch_dir, "store"))
    else:
        store = ShmStore("fuzz", 1 << 20, create=True, shm_root=scratch_dir)  # not /dev/shm
    r = Rig(request.param, store)
    yield r
    r.transport.copier.close()
    store.close()


@st.composite
def corruptions(draw, data: bytes, resizable: bool, payload_offset: int) -> tuple[str, bytes]:
    """(kind, corrupted bytes); positions anywhere, or (half the time) inside the payload."""
    kinds = ["none", "flip", "flip", "burst", "overwrite"] + (
        ["truncate", "extend"] if resizable else []
    )
    kind = draw(st.sampled_from(kinds))
    out = bytearray(data)
    where = st.integers(0, len(data) - 4) | st.integers(payload_offset, len(data) - 4)
    if kind == "flip":
        bit = 8 * draw(where) + draw(st.integers(0, 31))
        out[bit // 8] ^= 1 << (bit % 8)
    elif kind == "burst":
        at = draw(where)
        for i, m in enumerate(draw(st.integers(1, 2**32 - 1)).to_bytes(4, "little")):
            out[at + i] ^= m
    elif kind == "overwrite":
        at = draw(where)
        junk = draw(st.binary(min_size=1, max_size=8))[: len(data) - at]
        out[at : at + len(junk)] = junk
    elif kind == "truncate":
        del out[draw(where) :]
    elif kind == "extend":
        out += draw(st.binary(min_size=1, max_size=64))
    return kind, bytes(out)


@fuzz(250)
@given(st.data())
def test_kv_load_writes_only_verified_data_into_only_its_destination(rig, data):
    kind, corrupted = data.draw(
        corruptions(rig.pristine, rig.kind == "file", rig.snap.payload_offset)
    )
    first = data.draw(st.integers(0, len(SRC) - 1))
    end = data.draw(st.integers(first + 1, len(SRC)))
    dst = data.draw(st.permutations(FREE))[: end - first]
    rig.write(corrupted)
    try:
        for t in rig.layers:
            t[FREE] = POISON
        before = [t.clone() for t in rig.layers]
        try:
            rig.transport.load(rig.ref, first, end, dst, rig.chain[end - 1].hex())
            loaded = True
            event(f"{kind}: loaded")
        except LOADER_ERRORS as e:
            loaded = False
            event(f"{kind}: load refused ({type(e).__name__})")
        for b in set(range(CACHE_BLOCKS)) - set(dst):  # never a write outside the destination
            assert all(torch.equal(t[b], u[b]) for t, u in zip(rig.layers, before)), (
                f"block {b} written"
            )
        for i, b in enumerate(dst):  # only verified data: the original block, or untouched
            got = rig.block(b)
            assert torch.equal(got, rig.originals[first + i]) or (
                not loaded and bool((got == POISON).all())
            )
        if kind == "none":
            assert loaded
        verifier = SnapshotVerifier(
            lambda: rig.store, rig.namespace
        )  # the scheduler's header check
        accepted = verifier.verdict(rig.ref, end, rig.chain[end - 1].hex())  # never raises
        assert accepted or kind != "none"
        outcome(rig.snap, corrupted)  # and the parser-level property on the stored bytes
        if (
            rig.kind == "file"
        ):  # a fresh index over the corrupted file: a miss or a match, never a crash
            match = FileStore(rig.store.root).lookup(rig.namespace.key(), rig.chain)
            assert match is None or match.ref == rig.ref
    finally:
        rig.write(rig.pristine)


@fuzz(100)
@given(st.sampled_from(RAW_JSON), st.sampled_from(FIELD_PATHS))
@example(DEEP_ARRAY, ("token_ids",))  # finding 1 reached the scheduler's lookup: RecursionError
@example(BIG_INT, ("num_tokens",))  # finding 2
def test_store_index_skips_unreadable_headers(scratch_dir, raw, path):
    """A file in a store directory whose header holds any raw JSON: lookup skips it, never raises."""
    root = os.path.join(scratch_dir, f"index-{uuid.uuid4().hex[:8]}")
    store = FileStore(root)
    obj = GOLDEN.header_obj()
    container(obj, path)[path[-1]] = Raw(raw)
    key = GOLDEN.namespace.key()
    os.makedirs(os.path.join(root, key))
    with open(os.path.join(root, key, GOLDEN.header.snapshot_id + ".thawkv"), "wb") as f:
        f.write(assemble(render(obj).encode(), GOLDEN.payload))
    try:
        match = store.lookup(key, GOLDEN.header.block_hashes)
        assert match is None or match.num_blocks <= GOLDEN.header.num_blocks
        try:
            store.open(SnapshotRef(key, GOLDEN.header.snapshot_id)).close()
        except LOADER_ERRORS:
            pass
    finally:
        store.close()
