"""The ``.thawkv`` snapshot format: the KV cache of a prompt prefix, as data only (never pickle).

Layout (all integers little-endian)::

    offset 0               8 B   magic b"THAWKV01"
    offset 8               8 B   u64 header_len            (<= MAX_HEADER_BYTES = 16 MiB)
    offset 16     header_len B   UTF-8 JSON header (an object)
    ...                          zero padding up to payload_offset
    payload_offset              payload_offset = align_up(16 + header_len, 4096)
                   payload_bytes raw KV bytes, block-major:

    payload  | block 0                   | block 1                   | ... | block n-1 |
             | layer 0 | layer 1 | ...   | layer 0 | layer 1 | ...   |
             |<------ block_bytes ------>|
    chunks   |<--- chunk 0: blocks_per_chunk blocks --->|<--- chunk 1 --->| ... (last may be short)

A chunk is a whole number of blocks, so loading the first k blocks verifies exactly the chunks
that cover them. Each layer's page is opaque bytes, valid only within the same namespace (model,
dtype, kv-cache dtype, attention layout, block size, vLLM version...).

Header fields: ``format`` ("thawkv"), ``version`` (1), ``snapshot_id`` (8-64 lowercase hex),
``namespace`` (object, see :class:`Namespace`), ``num_tokens`` (= num_blocks * block_size),
``block_bytes`` (bytes of one block across all layers), ``payload_bytes`` (= num_blocks *
block_bytes), ``blocks_per_chunk``, ``hash_salt`` (hex, usually ""), ``created_unix``, ``extra``
(free-form object, nested at most ``MAX_EXTRA_DEPTH`` = 64 deep), ``chunk_crc32c`` (one 8-char
lowercase hex CRC32C per chunk; fixed width, so a
writer knows the header length before the CRCs exist), ``block_hashes`` (64-char hex per block,
equal to ``block_hash_chain(token_ids, block_size, salt)``) and ``token_ids`` (num_tokens ints).

Reading one without this package::

    import json, struct
    data = open(path, "rb").read()
    assert data[:8] == b"THAWKV01"
    (header_len,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + header_len])
    payload_offset = (16 + header_len + 4095) // 4096 * 4096
    payload = data[payload_offset : payload_offset + header["payload_bytes"]]
    bb = header["block_bytes"]
    block_3 = payload[3 * bb : 4 * bb]   # all layers of block 3

This module is the format (constants, header, parsing, validation); chunk ranges and CRCs are
:mod:`thaw_agents_core.snapshot.chunks`, writing snapshots and files
:mod:`thaw_agents_core.snapshot.io`.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.snapshot.block_hashes import HASH_ALGO, block_hash_chain
from thaw_agents_core.snapshot.errors import (
    SnapshotFormatError,
    SnapshotMismatchError,
)
from thaw_agents_core.snapshot.framing import (
    PREFIX_BYTES,
    Frame,
    align_up,
    as_bytes_view,
    header_bytes,
    is_hex_bytes,
    is_int,
    short,
)
from thaw_agents_core.snapshot.namespace import Namespace

MAGIC = b"THAWKV01"
FORMAT_NAME = "thawkv"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 4 << 20  # CRC granularity; also the unit a partial load verifies
MAX_EXTRA_DEPTH = 64  # deeper ``extra`` parses, then breaks recursive code (asdict, deepcopy)

_HEX_ID = re.compile(r"[0-9a-f]{8,64}")
_HEX_CRC = re.compile(r"[0-9a-f]{8}")
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_HEX_RUN = re.compile(r"[0-9a-f]*")


def _all_hex(values: list[Any], width: int) -> bool:
    """Whether every value is a str of ``width`` lowercase hex chars (one regex pass in total)."""
    return (
        set(map(type, values)) <= {str}
        and set(map(len, values)) <= {width}
        and _HEX_RUN.fullmatch("".join(values)) is not None
    )


FRAME = Frame(
    MAGIC, FORMAT_NAME, FORMAT_VERSION, SnapshotFormatError, "snapshot", ".thawkv snapshot"
)


_HEADER_FIELDS = (
    "format", "version", "snapshot_id", "namespace", "num_tokens", "block_bytes",
    "payload_bytes", "blocks_per_chunk", "hash_salt", "created_unix", "extra",
    "chunk_crc32c", "block_hashes", "token_ids",
)  # fmt: skip


def _err(message: str) -> SnapshotFormatError:
    return SnapshotFormatError(message)


def _hex(pattern: re.Pattern[str]) -> Any:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _nonneg_int(v: Any) -> bool:
    return is_int(v) and v >= 0


def json_nesting(value: Any, limit: int = MAX_EXTRA_DEPTH) -> int:
    """How many dicts/lists deep ``value`` nests (0 for a scalar), counted to ``limit + 1`` at
    most; iterative, so any depth is measured without recursion."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [x for x in level if isinstance(x, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
    return depth


# Per-field type checks, in header order: (predicate, what the message says is valid).
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "snapshot_id": (_hex(_HEX_ID), "8-64 lowercase hex chars"),
    "num_tokens": (_nonneg_int, "a non-negative int"),
    "block_bytes": (_nonneg_int, "a non-negative int"),
    "payload_bytes": (_nonneg_int, "a non-negative int"),
    "blocks_per_chunk": (lambda v: is_int(v) and v > 0, "a positive int"),
    "hash_salt": (is_hex_bytes, "lowercase hex"),
    "created_unix": (
        # ints are finite: math.isfinite(10**400) would raise OverflowError
        lambda v: (is_int(v) or isinstance(v, float) and math.isfinite(v)) and v >= 0,
        "a non-negative number",
    ),
    "extra": (lambda v: isinstance(v, dict), "an object"),
    "chunk_crc32c": (lambda v: isinstance(v, list), "a list"),
    "block_hashes": (lambda v: isinstance(v, list), "a list"),
    "token_ids": (lambda v: isinstance(v, list), "a list"),
}


@dataclass(slots=True)
class SnapshotHeader:
    """Decoded header. Derived sizes are properties so they can never disagree."""

    snapshot_id: str
    namespace: Namespace
    token_ids: list[int]
    block_hashes: list[bytes]
    block_bytes: int
    blocks_per_chunk: int
    chunk_crc32c: list[int]
    created_unix: float
    hash_salt: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        """Tokens per KV block (the namespace's block size)."""
        return self.namespace.block_size

    @property
    def num_blocks(self) -> int:
        """Number of KV blocks in the snapshot (one block hash each)."""
        return len(self.block_hashes)

    @property
    def num_tokens(self) -> int:
        """Number of prefix tokens (= num_blocks * block_size)."""
        return len(self.token_ids)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the payload (= num_blocks * block_bytes)."""
        return self.num_blocks * self.block_bytes

    @property
    def num_chunks(self) -> int:
        """Number of CRC32C chunks (the last may hold fewer blocks)."""
        return -(-self.num_blocks // self.blocks_per_chunk)  # ints: a float ceil is 0 for 10**400

    def to_json(self) -> dict[str, Any]:
        """The JSON header object as written to disk (CRCs and hashes in hex)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "snapshot_id": self.snapshot_id,
            "namespace": self.namespace.to_json(),
            "num_tokens": self.num_tokens,
            "block_bytes": self.block_bytes,
            "payload_bytes": self.payload_bytes,
            "blocks_per_chunk": self.blocks_per_chunk,
            "hash_salt": self.hash_salt.hex(),
            "created_unix": self.created_unix,
            "extra": self.extra,
            "chunk_crc32c": [f"{c:08x}" for c in self.chunk_crc32c],
            "block_hashes": [h.hex() for h in self.block_hashes],
            "token_ids": self.token_ids,
        }

    @classmethod
    def from_json(cls, obj: Any) -> SnapshotHeader:
        """Validate every field (types, sizes, hash chain) and decode."""
        FRAME.check_envelope(obj, _HEADER_FIELDS)
        for name, (ok, what) in _FIELD_CHECKS.items():
            if not ok(obj[name]):
                raise _err(f"header field {name!r} must be {what}, got {short(obj[name])}")
        if json_nesting(obj["extra"]) > MAX_EXTRA_DEPTH:
            raise _err(
                f"header field 'extra' nests more than MAX_EXTRA_DEPTH = {MAX_EXTRA_DEPTH} deep"
            )
        tokens = obj["token_ids"]
        if not set(map(type, tokens)) <= {int} or (
            tokens and (min(tokens) < 0 or max(tokens) >= 2**31)
        ):
            raise _err("header field 'token_ids' must be a list of ints in [0, 2**31)")

        ns = Namespace.from_json(obj["namespace"])
        if ns.hash_algo != HASH_ALGO:
            raise _err(f"namespace.hash_algo {ns.hash_algo!r} is not supported: "
                       f"this reader verifies {HASH_ALGO!r}")  # fmt: skip
        num_tokens, bs = obj["num_tokens"], ns.block_size
        if num_tokens != len(tokens):
            raise _err(
                f"header field 'num_tokens' is {num_tokens} but 'token_ids' has {len(tokens)} ids"
            )
        if num_tokens % bs:
            raise _err(f"num_tokens {num_tokens} is not a multiple of block_size {bs}: "
                       "a snapshot covers whole blocks only")  # fmt: skip
        nb = num_tokens // bs
        if nb == 0:
            raise _err("snapshot covers no block (num_tokens is 0)")
        block_bytes, bpc = obj["block_bytes"], obj["blocks_per_chunk"]
        if block_bytes == 0:
            raise _err("header field 'block_bytes' must be positive, got 0")
        if obj["payload_bytes"] != nb * block_bytes:
            raise _err(f"header field 'payload_bytes' is {obj['payload_bytes']}, expected num_blocks * "
                       f"block_bytes = {nb} * {block_bytes} = {nb * block_bytes}")  # fmt: skip
        hashes_hex = obj["block_hashes"]
        if len(hashes_hex) != nb:
            raise _err(
                f"'block_hashes' has {len(hashes_hex)} entries, expected one per block ({nb})"
            )
        if not _all_hex(hashes_hex, 64):  # one regex pass; the loop only names the culprit
            for i, h in enumerate(hashes_hex):
                if not isinstance(h, str) or _HEX_HASH.fullmatch(h) is None:
                    raise _err(f"block_hashes[{i}] must be 64 lowercase hex chars, got {short(h)}")
        crcs_hex = obj["chunk_crc32c"]
        num_chunks = -(-nb // bpc)  # integer ceil: ceil(nb / bpc) in floats is 0 for bpc = 10**400
        if len(crcs_hex) != num_chunks:
            raise _err(f"'chunk_crc32c' has {len(crcs_hex)} entries, "
                       f"expected ceil({nb} / {bpc}) = {num_chunks}")  # fmt: skip
        if not _all_hex(crcs_hex, 8):
            for i, c in enumerate(crcs_hex):
                if not isinstance(c, str) or _HEX_CRC.fullmatch(c) is None:
                    raise _err(f"chunk_crc32c[{i}] must be 8 lowercase hex chars, got {short(c)}")
        salt = bytes.fromhex(obj["hash_salt"])
        hashes = [bytes.fromhex(h) for h in hashes_hex]
        expected = block_hash_chain(tokens, bs, salt)
        if hashes != expected:
            i = next(i for i, (a, b) in enumerate(zip(hashes, expected)) if a != b)
            raise _err(f"block_hashes[{i}] does not match the hash of token_ids (block {i} of {nb}): "
                       "the header is corrupt")  # fmt: skip
        return cls(
            snapshot_id=obj["snapshot_id"], namespace=ns, token_ids=tokens, block_hashes=hashes,
            block_bytes=block_bytes, blocks_per_chunk=bpc, chunk_crc32c=[int(c, 16) for c in crcs_hex],
            created_unix=obj["created_unix"], hash_salt=salt, extra=obj["extra"],
        )  # fmt: skip


def encode_header(header: SnapshotHeader) -> bytes:
    """Everything before the payload: magic, header_len, JSON, zero padding to payload_offset."""
    return FRAME.encode(header.to_json(), "snapshot fewer tokens")


def payload_offset_for(header: SnapshotHeader) -> int:
    """Byte offset of the payload in a snapshot with this header (ALIGNMENT-aligned)."""
    return align_up(PREFIX_BYTES + len(header_bytes(header.to_json())))


@dataclass(slots=True)
class SnapshotView:
    """A validated snapshot over someone's buffer; ``payload`` is a zero-copy memoryview."""

    header: SnapshotHeader
    payload: memoryview
    payload_offset: int
    owner: Any = field(default=None, repr=False)  # closed by close(), e.g. the file's mmap

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole snapshot: prefix, header, padding and payload."""
        return self.payload_offset + len(self.payload)

    def blocks(self, num_blocks: int) -> memoryview:
        """Bytes of the first ``num_blocks`` blocks (all layers)."""
        if not 0 <= num_blocks <= self.header.num_blocks:
            raise ValueError(f"num_blocks {num_blocks} outside [0, {self.header.num_blocks}]")
        return self.payload[: num_blocks * self.header.block_bytes]

    def close(self) -> None:
        """Release the payload and unmap the owner (left to the GC while slices of it live)."""
        self.payload.release()
        owner, self.owner = self.owner, None
        if owner is not None and hasattr(owner, "close"):
            try:
                owner.close()
            except BufferError:
                pass

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ParsedHeaders:
    """Headers already parsed and validated in this process, by their exact bytes.

    Parsing is a pure function of the header bytes, and the same snapshot's header is read
    several times on the way to one load (the scheduler's check, the device prefetch, the
    worker: ~1.5-4 ms each at 8192 tokens, most of it re-deriving the block-hash chain). A hit
    costs a copy and a hash of the bytes; only headers that passed every check are kept, least
    recently used out past ``budget_bytes``. The header returned is shared: never mutate it.
    """

    def __init__(self, budget_bytes: int = 64 << 20) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._by_bytes: OrderedDict[bytes, tuple[SnapshotHeader, int]] = OrderedDict()
        self._bytes = 0

    def get(self, raw: bytes) -> tuple[SnapshotHeader, int] | None:
        with self._lock:
            hit = self._by_bytes.get(raw)
            if hit is not None:
                self._by_bytes.move_to_end(raw)
            return hit

    def put(self, raw: bytes, parsed: tuple[SnapshotHeader, int]) -> None:
        if len(raw) > self.budget_bytes // 4:
            return  # a huge header would evict everything else
        with self._lock:
            if raw not in self._by_bytes:
                self._bytes += len(raw)
            self._by_bytes[raw] = parsed
            while self._bytes > self.budget_bytes:
                old, _ = self._by_bytes.popitem(last=False)
                self._bytes -= len(old)


_PARSED = _ParsedHeaders()


def parse_header(buf: Any) -> tuple[SnapshotHeader, int]:
    """Validate magic, header_len and the JSON header; return (header, payload_offset).

    ``buf`` needs only the first ``16 + header_len`` bytes (enough to index a file without
    reading its payload). The same bytes parsed before return the same (shared, read-only)
    header without parsing them again.
    """
    mv = as_bytes_view(buf)
    raw = bytes(mv[: PREFIX_BYTES + FRAME.header_len(mv)])
    parsed = _PARSED.get(raw)
    if parsed is None:
        obj, payload_offset = FRAME.read_header(mv)
        parsed = (SnapshotHeader.from_json(obj), payload_offset)
        _PARSED.put(raw, parsed)
    return parsed


def parse_snapshot(
    buf: Any,
    *,
    expect_namespace: Namespace | None = None,
    on_prefix: Callable[[memoryview, int], None] | None = None,
) -> SnapshotView:
    """Validate everything but the CRCs (see :func:`verify_chunks`) and return a zero-copy view.

    ``buf`` (bytes, bytearray, memoryview, mmap) may extend past the snapshot's end.
    ``on_prefix(buf, payload_offset)`` runs once magic and header_len are checked, before the
    header is parsed and validated: a reader may start copying the payload into scratch memory
    meanwhile (never into anything live: the header may still be refused).
    """
    mv = as_bytes_view(buf)
    if on_prefix is not None:
        on_prefix(mv, align_up(PREFIX_BYTES + FRAME.header_len(mv)))
    header, payload_offset = parse_header(mv)
    payload = FRAME.payload(mv, payload_offset, header.payload_bytes)
    if expect_namespace is not None:
        diff = header.namespace.mismatches(expect_namespace)
        if diff:
            raise SnapshotMismatchError(diff)
    return SnapshotView(header, payload, payload_offset)
