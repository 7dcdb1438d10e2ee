"""The frame both snapshot formats share (``.thawkv`` KV, ``.thaw`` weights).

    offset 0   magic          8 bytes, one per format ("THAWKV01", "THAWWT01")
    offset 8   header_len     u64 little-endian, at most MAX_HEADER_BYTES
    offset 16  header         UTF-8 JSON object: "format", "version", then the format's fields
               zero padding   up to payload_offset = align_up(16 + header_len)
               payload        the format's bytes, checksummed by its header

Each format says what it is with a :class:`Frame` (magic, name, version, its error class and
how errors name a file); the functions here check everything the two have in common, with the
format's own error type and words.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

PREFIX_BYTES = 16
ALIGNMENT = 4096
MAX_HEADER_BYTES = 16 << 20


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (default ALIGNMENT, 4096 bytes)."""
    return (n + alignment - 1) // alignment * alignment


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (for error messages about foreign bytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def hex_bytes(value: Any) -> bytes | None:
    """The bytes of ``value`` when it is exactly their ``bytes.hex()`` (lowercase digit pairs,
    nothing else), else None. (``bytes.fromhex`` alone also takes spaces and capitals.)"""
    if not isinstance(value, str):
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if raw.hex() == value else None


def is_hex_bytes(value: Any) -> bool:
    """A str of lowercase hex digits in pairs (bytes written as ``bytes.hex()``)."""
    return hex_bytes(value) is not None


def as_bytes_view(buf: Any) -> memoryview:
    """A flat byte view of any buffer (bytes, bytearray, mmap, numpy array, memoryview)."""
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


@dataclass(frozen=True)
class Frame:
    """One format's frame: its magic, its ``format`` / ``version`` header fields, its error
    class, how messages name a file of it ("snapshot") and what a file of it is (".thawkv
    snapshot")."""

    magic: bytes
    name: str
    version: int
    error: type[Exception]
    noun: str
    kind: str

    def encode(self, header_obj: dict[str, Any], too_big_hint: str) -> bytes:
        """Everything before the payload: magic, header_len, JSON, zero padding."""
        body = header_bytes(header_obj)
        if len(body) > MAX_HEADER_BYTES:
            raise self.error(
                f"header is {len(body)} bytes, over the {MAX_HEADER_BYTES}-byte cap "
                f"(MAX_HEADER_BYTES): {too_big_hint}"
            )
        prefix = self.magic + struct.pack("<Q", len(body)) + body
        return prefix + bytes(align_up(len(prefix)) - len(prefix))

    def header_len(self, mv: memoryview) -> int:
        """header_len, once magic, the cap and the buffer's length are checked."""
        n = len(mv)
        if n < PREFIX_BYTES:
            raise self.error(
                f"truncated {self.noun}: {n} bytes, shorter than the {PREFIX_BYTES}-byte prefix "
                "(magic + header_len)"
            )
        if mv[:8] != self.magic:
            raise self.error(
                f"bad magic {bytes(mv[:8])!r}: not a {self.kind} (expected {self.magic!r})"
            )
        (header_len,) = struct.unpack_from("<Q", mv, 8)
        if header_len > MAX_HEADER_BYTES:
            raise self.error(
                f"header_len {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap "
                "(MAX_HEADER_BYTES): corrupt file"
            )
        end = PREFIX_BYTES + header_len
        if n < end:
            raise self.error(
                f"truncated {self.noun}: header needs bytes [16, {end}) but the buffer has "
                f"{n} bytes"
            )
        return header_len

    def read_header(self, buf: Any) -> tuple[Any, int]:
        """(decoded JSON header, payload_offset); ``buf`` needs only its first
        ``16 + header_len`` bytes."""
        mv = as_bytes_view(buf)
        end = PREFIX_BYTES + self.header_len(mv)
        try:
            obj = json.loads(bytes(mv[PREFIX_BYTES:end]).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # + int digit limit (ValueError), deep nesting
            raise self.error(f"header is not valid UTF-8 JSON: {e}") from None
        return obj, align_up(end)

    def payload(self, mv: memoryview, payload_offset: int, payload_bytes: int) -> memoryview:
        """The payload's zero-copy view, once the buffer is long enough and the padding zero."""
        end = payload_offset + payload_bytes
        if len(mv) < end:
            raise self.error(
                f"truncated {self.noun}: payload needs bytes [{payload_offset}, {end}) but the "
                f"buffer has {len(mv)} bytes ({end - len(mv)} missing)"
            )
        (header_len,) = struct.unpack_from("<Q", mv, 8)
        pad = mv[PREFIX_BYTES + header_len : payload_offset]
        if pad != bytes(len(pad)):
            raise self.error(
                f"non-zero padding before payload_offset {payload_offset}: the file is corrupt"
            )
        return mv[payload_offset:end]

    def check_envelope(self, obj: Any, fields: tuple[str, ...]) -> None:
        """The header is an object with exactly ``fields`` (custom data goes under "extra"),
        this format's name and a version this reader supports."""
        if not isinstance(obj, dict):
            raise self.error(f"header must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in fields if k not in obj]
        if missing:
            raise self.error(f"header is missing required field(s): {', '.join(missing)}")
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            raise self.error(
                f"header has unknown field(s): {', '.join(unknown)} (custom data goes under "
                "'extra')"
            )
        if obj["format"] != self.name:
            raise self.error(
                f"header field 'format' is {short(obj['format'])}, expected {self.name!r}"
            )
        if obj["version"] != self.version or not is_int(obj["version"]):
            raise self.error(
                f"unsupported {self.noun} version {short(obj['version'])}: this reader supports "
                f"version {self.version}"
            )


def header_bytes(header_obj: dict[str, Any]) -> bytes:
    """The header's JSON as written: compact, ASCII."""
    return json.dumps(header_obj, separators=(",", ":"), ensure_ascii=True).encode()
