"""The ``.thaw`` weight snapshot format: a model's tensors as data only (never pickle).

Layout (all integers little-endian), like ``.thawkv``::

    offset 0               8 B   magic b"THAWWT01"
    offset 8               8 B   u64 header_len            (<= MAX_HEADER_BYTES = 16 MiB)
    offset 16     header_len B   UTF-8 JSON header (an object)
    ...                          zero padding up to payload_offset
    payload_offset              payload_offset = align_up(16 + header_len, 4096)
                   payload_bytes the tensors, each at a TENSOR_ALIGNMENT-aligned offset:

    payload  | tensor 0 | pad | tensor 1 | pad | ... | tensor n-1 |
             |<- nbytes ->|                                          offsets payload-relative
    chunks   | c0 | c1 | c2 |   (per tensor: crc_chunk_bytes pieces from the tensor's start,
                                 the last one short) -> tensors[i]["crc32c"]

A tensor's chunks never straddle two tensors, so a restore checks each tensor's bytes where they
land (on the GPU: the chunk CRC32C kernel on the destination) before any request runs.

Header fields: ``format`` ("thaw"), ``version`` (1), ``namespace`` (object, see
:class:`WeightsNamespace`), ``payload_bytes``, ``crc_chunk_bytes``, ``created_unix``, ``extra``
(free-form object) and ``tensors``: a list of ``{"name", "dtype", "shape", "offset", "nbytes",
"crc32c"}`` in payload order (offsets increasing, aligned, no overlap; ``nbytes`` = numel *
itemsize; ``crc32c`` one 8-char lowercase hex per chunk). ``dtype`` is a name from ``DTYPES``.

Reading one without this package::

    import json, struct, numpy as np
    data = open(path, "rb").read()
    assert data[:8] == b"THAWWT01"
    (n,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + n])
    base = (16 + n + 4095) // 4096 * 4096
    t = header["tensors"][0]                     # float32 / float16 / int* map onto numpy
    arr = np.frombuffer(data, np.float32, count=t["nbytes"] // 4, offset=base + t["offset"])

This module is the format (constants, header, parsing, validation, CRCs); per-rank file names
are :mod:`thaw_agents_core.weights.ranks`, writing and opening files :mod:`.io`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.snapshot.chunks import crc32c
from thaw_agents_core.snapshot.errors import (
    SnapshotChecksumError,
    SnapshotError,
    SnapshotFormatError,
)
from thaw_agents_core.snapshot.framing import (
    Frame,
    align_up,
    as_bytes_view,
    is_int,
    short,
)

MAGIC = b"THAWWT01"
FORMAT_NAME = "thaw"
FORMAT_VERSION = 1
TENSOR_ALIGNMENT = 256  # every tensor starts on a 256-byte boundary (any dtype, DMA-friendly)
DEFAULT_CRC_CHUNK_BYTES = 16 << 20

LAYOUTS = ("engine", "checkpoint")
"""``engine``: the parameters as a vLLM engine holds them (fused qkv/gate_up, this rank's shard):
copied straight back. ``checkpoint``: the model folder's names and shapes (unfused, unsharded):
restored through the model's own ``load_weights`` (vLLM fuses and shards)."""

# dtype name -> itemsize. Names are torch's without the "torch." prefix.
DTYPES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip

_HEX_CRC = re.compile(r"[0-9a-f]{8}")
_HEX_RUN = re.compile(r"[0-9a-f]*")


class WeightsError(SnapshotError):
    """Base of every ``.thaw`` error."""


class WeightsFormatError(WeightsError, SnapshotFormatError):
    """The bytes are not a well-formed ``.thaw`` weight snapshot."""


class WeightsMismatchError(WeightsError):
    """A well-formed snapshot that does not fit this engine (namespace or tensor table)."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = mismatches
        shown = mismatches[:20] + (
            [f"... and {len(mismatches) - 20} more"] if len(mismatches) > 20 else []
        )
        super().__init__("weight snapshot does not fit this engine:\n  " + "\n  ".join(shown))


class WeightsChecksumError(WeightsError, SnapshotChecksumError):
    """Tensor bytes do not match their chunk CRC32C."""

    def __init__(self, bad: list[tuple[str, int]]):
        self.bad = bad
        SnapshotError.__init__(
            self,
            f"CRC32C mismatch in {len(bad)} chunk(s) (tensor, chunk): "
            f"{bad[:10]}: the snapshot is corrupt or changed while read",
        )


def _err(message: str) -> WeightsFormatError:
    return WeightsFormatError(message)


FRAME = Frame(
    MAGIC, FORMAT_NAME, FORMAT_VERSION, WeightsFormatError, ".thaw file", ".thaw weight snapshot"
)


@dataclass(frozen=True, slots=True)
class WeightsNamespace:
    """What a weight snapshot is (compared before a restore; ``weights_version`` is its name)."""

    model_fingerprint: str
    """Fingerprint of the model the weights came from (config and weight files), informational."""
    architecture: str
    """The model class, e.g. "LlamaForCausalLM": must equal the engine's."""
    dtype: str
    """Parameter dtype of the engine ("bfloat16", "float32", ...): must equal the engine's."""
    layout: str
    """One of LAYOUTS."""
    tp_rank: int
    tp_size: int
    weights_version: str
    """The version this snapshot installs (the KV namespace's weights_version after a swap)."""

    def __post_init__(self) -> None:
        for name in ("model_fingerprint", "architecture", "dtype", "layout", "weights_version"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(
                    f"namespace field {name!r} must be a string, got {short(getattr(self, name))}"
                )
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"namespace field 'layout' must be one of {LAYOUTS}, got {self.layout!r}"
            )
        if not is_int(self.tp_size) or self.tp_size < 1:
            raise ValueError(
                f"namespace field 'tp_size' must be a positive int, got {short(self.tp_size)}"
            )
        if not is_int(self.tp_rank) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(
                f"namespace field 'tp_rank' must be an int in [0, tp_size={self.tp_size}), "
                f"got {short(self.tp_rank)}"
            )

    def to_json(self) -> dict[str, Any]:
        """The namespace as the header's ``namespace`` object."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> WeightsNamespace:
        """Decode the header's ``namespace`` object; WeightsFormatError on a missing, unknown or
        invalid field."""
        if not isinstance(obj, Mapping):
            raise _err(f"header field 'namespace' must be an object, got {short(obj)}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in obj]
        unknown = sorted(set(obj) - set(names))
        if missing or unknown:
            raise _err(f"namespace fields do not match: missing {missing}, unknown {unknown}")
        try:
            return cls(**{n: obj[n] for n in names})
        except ValueError as e:
            raise _err(str(e)) from None

    def mismatches(self, engine: WeightsNamespace) -> list[str]:
        """Fields that must agree for a restore (not the fingerprint nor the version). An
        empty architecture (a state dict's) matches any; checkpoint-layout tensors are cast and
        sharded by vLLM's weight loaders, so their dtype and tensor-parallel rank need not match."""
        out = []
        for name in ("architecture", "dtype", "tp_rank", "tp_size"):
            a, b = getattr(self, name), getattr(engine, name)
            if (name == "architecture" and not a) or (
                self.layout == "checkpoint" and name in ("dtype", "tp_rank", "tp_size")
            ):
                continue
            if a != b:
                out.append(f"{name}: snapshot has {a!r}, this engine has {b!r}")
        return out


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the table; ``offset`` is payload-relative."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    crc32c: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (elements times dtype size)."""
        return math.prod(self.shape) * DTYPES[self.dtype]

    def num_chunks(self, crc_chunk_bytes: int) -> int:
        """CRC chunks of ``crc_chunk_bytes`` that cover the tensor (the last may be short)."""
        return math.ceil(self.nbytes / crc_chunk_bytes)

    def to_json(self) -> dict[str, Any]:
        """The entry as a header ``tensors`` item (CRCs as 8-digit hex)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32c": [f"{c:08x}" for c in self.crc32c],
        }


_HEADER_FIELDS = (
    "format",
    "version",
    "namespace",
    "payload_bytes",
    "crc_chunk_bytes",
    "created_unix",
    "extra",
    "tensors",
)
_TENSOR_FIELDS = ("name", "dtype", "shape", "offset", "nbytes", "crc32c")


def _parse_tensor(i: int, t: Any, crc_chunk_bytes: int) -> TensorEntry:
    if not isinstance(t, dict) or set(t) != set(_TENSOR_FIELDS):
        keys = sorted(t) if isinstance(t, dict) else type(t).__name__
        raise _err(
            f"tensors[{i}] must be an object with exactly {list(_TENSOR_FIELDS)}, got {keys}"
        )
    name, dtype, shape = t["name"], t["dtype"], t["shape"]
    if not isinstance(name, str) or not name:
        raise _err(f"tensors[{i}].name must be a non-empty string, got {short(name)}")
    if dtype not in DTYPES:
        raise _err(f"tensors[{i}] ({name}): dtype {short(dtype)} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise _err(
            f"tensors[{i}] ({name}): shape must be a list of non-negative ints, got {short(shape)}"
        )
    offset = t["offset"]
    if not is_int(offset) or offset < 0 or offset % TENSOR_ALIGNMENT:
        raise _err(
            f"tensors[{i}] ({name}): offset must be a non-negative multiple of "
            f"{TENSOR_ALIGNMENT}, got {short(offset)}"
        )
    nbytes = math.prod(shape) * DTYPES[dtype]
    if t["nbytes"] != nbytes or not is_int(t["nbytes"]):
        raise _err(
            f"tensors[{i}] ({name}): nbytes is {short(t['nbytes'])}, expected "
            f"prod({shape}) * {DTYPES[dtype]} = {nbytes}"
        )
    crcs = t["crc32c"]
    expected = math.ceil(nbytes / crc_chunk_bytes)
    if not isinstance(crcs, list) or len(crcs) != expected:
        raise _err(
            f"tensors[{i}] ({name}): crc32c must list ceil({nbytes} / {crc_chunk_bytes}) = "
            f"{expected} chunk CRCs, got {short(crcs)}"
        )
    if not (
        set(map(type, crcs)) <= {str}
        and set(map(len, crcs)) <= {8}
        and _HEX_RUN.fullmatch("".join(crcs))
    ):
        bad = next(c for c in crcs if not (isinstance(c, str) and _HEX_CRC.fullmatch(c)))
        raise _err(
            f"tensors[{i}] ({name}): crc32c entries must be 8 lowercase hex chars, got {short(bad)}"
        )
    return TensorEntry(name, dtype, tuple(shape), offset, tuple(int(c, 16) for c in crcs))


@dataclass(slots=True)
class WeightsHeader:
    """Decoded header of a ``.thaw`` file."""

    namespace: WeightsNamespace
    tensors: list[TensorEntry]
    payload_bytes: int
    crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES
    created_unix: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tensor_bytes(self) -> int:
        """Bytes of tensor data (the payload without alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, TensorEntry]:
        """The tensor entries keyed by tensor name."""
        return {t.name: t for t in self.tensors}

    def to_json(self) -> dict[str, Any]:
        """The header as its JSON object (what :meth:`from_json` reads)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "namespace": self.namespace.to_json(),
            "payload_bytes": self.payload_bytes,
            "crc_chunk_bytes": self.crc_chunk_bytes,
            "created_unix": self.created_unix,
            "extra": self.extra,
            "tensors": [t.to_json() for t in self.tensors],
        }

    @classmethod
    def from_json(cls, obj: Any) -> WeightsHeader:
        """Validate every field (types, sizes, offsets, CRC counts) and decode."""
        FRAME.check_envelope(obj, _HEADER_FIELDS)
        chunk, payload = obj["crc_chunk_bytes"], obj["payload_bytes"]
        if not is_int(chunk) or chunk <= 0 or chunk % TENSOR_ALIGNMENT:
            raise _err(
                f"header field 'crc_chunk_bytes' must be a positive multiple of {TENSOR_ALIGNMENT}, "
                f"got {short(chunk)}"
            )
        if not is_int(payload) or payload < 0:
            raise _err(
                f"header field 'payload_bytes' must be a non-negative int, got {short(payload)}"
            )
        created = obj["created_unix"]
        if (
            not (is_int(created) or isinstance(created, float))
            or not math.isfinite(created)
            or created < 0
        ):
            raise _err(
                f"header field 'created_unix' must be a non-negative number, got {short(created)}"
            )
        if not isinstance(obj["extra"], dict):
            raise _err(f"header field 'extra' must be an object, got {short(obj['extra'])}")
        if not isinstance(obj["tensors"], list):
            raise _err(f"header field 'tensors' must be a list, got {short(obj['tensors'])}")
        namespace = WeightsNamespace.from_json(obj["namespace"])
        tensors = [_parse_tensor(i, t, chunk) for i, t in enumerate(obj["tensors"])]
        seen: set[str] = set()
        end = 0
        for i, t in enumerate(tensors):
            if t.name in seen:
                raise _err(f"tensors[{i}]: duplicate tensor name {t.name!r}")
            seen.add(t.name)
            if t.offset < end:
                raise _err(
                    f"tensors[{i}] ({t.name}): offset {t.offset} overlaps the previous tensor "
                    f"(which ends at {end}); tensors are in payload order"
                )
            end = t.offset + t.nbytes
        if end > payload:
            raise _err(f"the last tensor ends at {end}, past payload_bytes {payload}")
        if payload != align_up(end, TENSOR_ALIGNMENT):
            raise _err(
                f"header field 'payload_bytes' is {payload}, expected the aligned end of the "
                f"last tensor, {align_up(end, TENSOR_ALIGNMENT)}"
            )
        return cls(
            namespace=namespace,
            tensors=tensors,
            payload_bytes=payload,
            crc_chunk_bytes=chunk,
            created_unix=created,
            extra=obj["extra"],
        )


def plan_tensors(specs: list[tuple[str, str, tuple[int, ...]]]) -> tuple[list[TensorEntry], int]:
    """Offsets for ``(name, dtype, shape)`` in order (CRCs empty); returns (entries, payload_bytes)."""
    entries, offset = [], 0
    for name, dtype, shape in specs:
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        entry = TensorEntry(name, dtype, tuple(int(d) for d in shape), offset)
        entries.append(entry)
        offset = align_up(offset + entry.nbytes, TENSOR_ALIGNMENT)
    return entries, offset


def encode_header(header: WeightsHeader) -> bytes:
    """Magic, header_len, JSON and zero padding up to payload_offset."""
    return FRAME.encode(header.to_json(), "raise crc_chunk_bytes")


def parse_header(buf: Any) -> tuple[WeightsHeader, int]:
    """Validate magic, header_len and the JSON header; return (header, payload_offset).

    ``buf`` needs only the first ``16 + header_len`` bytes.
    """
    obj, payload_offset = FRAME.read_header(buf)
    return WeightsHeader.from_json(obj), payload_offset


def parse_weights(buf: Any) -> tuple[WeightsHeader, memoryview]:
    """Validate everything but the CRCs; return (header, zero-copy payload view)."""
    mv = as_bytes_view(buf)
    header, payload_offset = parse_header(mv)
    return header, FRAME.payload(mv, payload_offset, header.payload_bytes)


def tensor_crcs(data: Any, crc_chunk_bytes: int) -> list[int]:
    """CRC32C of each ``crc_chunk_bytes`` chunk of one tensor's bytes (CPU)."""
    mv = as_bytes_view(data)
    return [crc32c(mv[i : i + crc_chunk_bytes]) for i in range(0, len(mv), crc_chunk_bytes)]


def check_tensor_crcs(entry: TensorEntry, crcs: list[int]) -> list[tuple[str, int]]:
    """(name, chunk) of every chunk whose CRC differs from the table's."""
    bad = [
        (entry.name, i) for i, (got, want) in enumerate(zip(crcs, entry.crc32c)) if int(got) != want
    ]
    if len(crcs) != len(entry.crc32c):
        bad.append((entry.name, min(len(crcs), len(entry.crc32c))))
    return bad


def verify_payload(header: WeightsHeader, payload: Any) -> list[tuple[str, int]]:
    """CRC32C every chunk of every tensor on the CPU; the bad (tensor, chunk) pairs."""
    mv = as_bytes_view(payload)
    bad: list[tuple[str, int]] = []
    for t in header.tensors:
        bad += check_tensor_crcs(
            t, tensor_crcs(mv[t.offset : t.offset + t.nbytes], header.crc_chunk_bytes)
        )
    return bad
