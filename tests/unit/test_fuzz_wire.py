"""Fuzzing the ForkPool wire (thaw_agents_core/pool/wire.py): the frames a worker and its parent
exchange, ``u32 little-endian length | UTF-8 JSON object``.

Documented behaviour, checked on arbitrary bytes in arbitrary chunkings:

- a malformed frame (not UTF-8 JSON, not an object with a string ``type``) or one longer than
  ``MAX_FRAME_BYTES`` raises :class:`WireError`, from ``FrameBuffer.feed`` (the worker's side)
  and from ``read_message`` (the parent's side); nothing else ever comes out (the pool's reader
  task catches exactly ``WireError``);
- an oversized length is refused as soon as its 4 bytes arrive, without waiting for the body;
- a frame cut short is "wait for more" for ``FrameBuffer`` and end of stream (``None``) for
  ``read_message`` at EOF;
- every message ``encode`` accepts comes back equal, however the stream is split.
"""

from __future__ import annotations

import asyncio
import json
import struct
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from thaw_agents_core.pool import wire

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

text = st.text(max_size=12) | st.text(
    st.characters(exclude_categories=()), max_size=6
)  # + lone surrogates
messages = st.builds(
    lambda kind, rest: {**rest, "type": kind}, text, st.dictionaries(text, json_values, max_size=5)
)


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def read_all(loop, chunks: list[bytes]) -> tuple[list[dict], BaseException | None]:
    """Every message ``read_message`` returns from ``chunks`` then EOF, and the WireError that
    stopped it (None: it reached end of stream)."""

    async def go():
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        out = []
        try:
            while (message := await wire.read_message(reader)) is not None:
                out.append(message)
        except wire.WireError as exc:
            return out, exc
        return out, None

    return loop.run_until_complete(go())


def feed_all(chunks: list[bytes]) -> tuple[list[dict], BaseException | None]:
    buf, out = wire.FrameBuffer(), []
    try:
        for chunk in chunks:
            out += buf.feed(chunk)
    except wire.WireError as exc:
        return out, exc
    return out, None


# -- valid frames ---------------------------------------------------------------------------


@fuzz(300)
@given(st.lists(messages, max_size=5), st.lists(st.integers(0, 2**16), max_size=8))
def test_valid_messages_round_trip_in_any_chunking(loop, msgs, cuts):
    data = b"".join(wire.encode(m) for m in msgs)
    chunks = split(data, cuts)
    assert feed_all(chunks) == (msgs, None)
    assert read_all(loop, chunks) == (msgs, None)
    for m in msgs:
        assert wire.encode(m)[4:] == json.dumps(m, separators=(",", ":")).encode()


@fuzz(200)
@given(messages, st.data())
def test_a_frame_cut_short_waits_then_ends_the_stream(loop, msg, data):
    whole = wire.encode(msg)
    cut = data.draw(st.integers(0, len(whole) - 1))
    buf = wire.FrameBuffer()
    assert buf.feed(whole[:cut]) == []  # waits for the rest
    assert buf.feed(whole[cut:]) == [msg]
    assert read_all(loop, [whole[:cut]]) == ([], None)  # the peer died mid-frame: end of stream


# -- anything else ----------------------------------------------------------------------------


def check_only_wire_errors(loop, chunks: list[bytes]) -> None:
    for got, exc in (feed_all(chunks), read_all(loop, chunks)):
        assert exc is None or isinstance(exc, wire.WireError)
        for m in got:
            assert isinstance(m, dict) and isinstance(m["type"], str)


@fuzz(300)
@given(st.binary(max_size=200), st.lists(st.integers(0, 2**16), max_size=6))
def test_arbitrary_bytes_raise_only_wire_errors(loop, data, cuts):
    check_only_wire_errors(loop, split(data, cuts))


BODIES = [
    RAW_JSON[2].encode(),
    RAW_JSON[3].encode(),
    RAW_JSON[0].encode(),
    b'{"type":"x","n":' + RAW_JSON[0].encode() + b"}",
    b'{"type":"x","n":' + RAW_JSON[2].encode() + b"}",
]


@fuzz(300)
@given(
    hostile_json.map(lambda v: render(v).encode())
    | st.builds(
        lambda m, at, junk: (lambda b: b[:at] + junk + b[at:])(render(m).encode()),
        messages,
        st.integers(0, 64),
        st.sampled_from(INVALID_UTF8) | st.binary(min_size=1, max_size=3),
    ),
    st.lists(st.integers(0, 2**16), max_size=4),
)
@example(BODIES[0], [])  # finding 5: 5000-deep nesting raised RecursionError, not WireError
@example(BODIES[1], [])
@example(BODIES[2], [])  # finding 6: a 4301-digit int raised a bare ValueError
@example(BODIES[3], [3, 9])
@example(BODIES[4], [])
@example(b"\xef\xbb\xbf{}", [])  # a BOM: json.loads(bytes) accepts utf-8-sig; still not a message
def test_any_json_or_broken_body_in_a_frame(loop, body, cuts):
    """Frames whose body is any JSON (wrong types, huge numbers, deep nesting, NaN...) or a
    message with bytes spliced in (not UTF-8, NUL, BOM): a message object or a WireError."""
    check_only_wire_errors(loop, split(frame(body) + wire.encode({"type": "after"}), cuts))
    got, exc = feed_all([frame(body)])
    if exc is None:  # accepted: exactly what json.loads makes of the body, a dict with a str type
        assert got == [json.loads(body)]


@fuzz(200)
@given(st.integers(wire.MAX_FRAME_BYTES + 1, 2**32 - 1), st.binary(max_size=16))
def test_oversized_lengths_are_refused_before_the_body(loop, length, tail):
    header = struct.pack("<I", length)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.FrameBuffer().feed(header)  # at once: no 4 GiB buffered first
    got, exc = read_all(loop, [header + tail])
    assert got == [] and isinstance(exc, wire.WireError)


@fuzz(100)
@given(st.integers(0, 64), messages)
def test_encode_refuses_what_the_peer_would_refuse(limit, msg):
    with mock.patch.object(wire, "MAX_FRAME_BYTES", limit):
        try:
            data = wire.encode(msg)
        except wire.WireError:
            assert len(json.dumps(msg, separators=(",", ":")).encode()) > limit
            return
        assert wire.FrameBuffer().feed(data) == [msg]
