"""The ForkPool wire: length-prefixed JSON frames (thaw_agents_core/pool/wire.py), round trips
and refusals. The pool itself, on real engines: tests/integration/test_pool.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from thaw_agents_core.pool import wire


def test_wire_round_trip_in_any_chunking():
    messages = [
        {
            "type": "generate",
            "id": "fork-1",
            "prompt_ids": list(range(3000)),
            "options": {"max_tokens": 8, "stop": ["\n"], "logit_bias": {"65": 1.5}},
            "stream": True,
        },
        {"type": "delta", "id": "fork-1", "text": "h\u00e9llo \u2603 \x00", "num_tokens": 3},
        {"type": "shutdown"},
    ]
    data = b"".join(wire.encode(m) for m in messages)
    assert int.from_bytes(data[:4], "little") == len(
        json.dumps(messages[0], separators=(",", ":")).encode()
    )
    whole = wire.FrameBuffer()
    assert whole.feed(data) == messages
    bytewise = wire.FrameBuffer()
    got = [m for i in range(len(data)) for m in bytewise.feed(data[i : i + 1])]
    assert got == messages
    assert bytewise.feed(b"") == []


async def test_wire_stream_reader_round_trip_and_end_of_stream():
    reader = asyncio.StreamReader()
    reader.feed_data(wire.encode({"type": "pong", "id": 7, "num_running": 0}))
    reader.feed_data(wire.encode({"type": "ping", "id": 8})[:6])  # cut mid-frame: peer died
    reader.feed_eof()
    assert await wire.read_message(reader) == {"type": "pong", "id": 7, "num_running": 0}
    assert await wire.read_message(reader) is None
    assert await wire.read_message(reader) is None


async def test_wire_refuses_oversized_frames(monkeypatch):
    header = (wire.MAX_FRAME_BYTES + 1).to_bytes(4, "little")
    with pytest.raises(wire.WireError, match=f"exceeds {wire.MAX_FRAME_BYTES}"):
        wire.FrameBuffer().feed(header + b"{}")
    reader = asyncio.StreamReader()
    reader.feed_data(header)
    with pytest.raises(wire.WireError, match="exceeds"):
        await wire.read_message(reader)
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 1024)
    with pytest.raises(wire.WireError, match="exceeds 1024"):
        wire.encode({"type": "done", "text": "x" * 2000})


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b'"text"', b'{"id": 1}', b'{"type": 3}'],
)
async def test_wire_garbage_is_a_wire_error(body):
    frame = len(body).to_bytes(4, "little") + body
    with pytest.raises(wire.WireError):
        wire.FrameBuffer().feed(frame)
    reader = asyncio.StreamReader()
    reader.feed_data(frame)
    reader.feed_eof()
    with pytest.raises(wire.WireError):
        await wire.read_message(reader)
