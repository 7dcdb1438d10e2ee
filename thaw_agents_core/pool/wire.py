"""The ForkPool wire: length-prefixed JSON frames over a Unix socket pair. Never pickle.

    frame = u32 little-endian length | UTF-8 JSON object       (at most MAX_FRAME_BYTES)

parent -> worker                               worker -> parent
  {"type": "generate", "id", "prompt_ids",       {"type": "ready", "pid", "namespace_key", ...}
   "options": {GenerationOptions fields},        {"type": "delta", "id", "text", "num_tokens"}
   "stream": bool}                               {"type": "done", "id", "text", "token_ids",
  {"type": "abort", "id"}                          "finish_reason", "num_cached_tokens",
  {"type": "ping", "id"}                           "prompt_tokens", "ttft_s", "total_s"}
  {"type": "shutdown"}                           {"type": "error", "id", "message"}
  {"type": "load_weights", "id", "source":       {"type": "pong", "id", "num_running"}
   {weights source descriptor},                  {"type": "weights_loaded", "id",
   "weights_version"}                              "weights_version", "namespace_key", "stats"}
"""

from __future__ import annotations

import asyncio
import json
import reprlib
import socket
import struct
from typing import Any

MAX_FRAME_BYTES = 64 << 20
_HEADER = struct.Struct("<I")


class WireError(RuntimeError):
    """A malformed or oversized frame: the peer is broken or not ours."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame (length prefix + compact JSON); WireError when over MAX_FRAME_BYTES."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:  # + int digit limit (ValueError), deep nesting
        raise WireError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError(f"frame is not a message object: {reprlib.repr(message)}")  # bounded depth
    return message


class FrameBuffer:
    """Incremental decoder for a non-blocking socket (the worker's side)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return the messages now complete (keeps a partial frame);
        WireError on an oversized or malformed frame."""
        self._data += data
        messages = []
        while len(self._data) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._data)
            if length > MAX_FRAME_BYTES:
                raise WireError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
            if len(self._data) < _HEADER.size + length:
                break
            body = bytes(self._data[_HEADER.size : _HEADER.size + length])
            del self._data[: _HEADER.size + length]
            messages.append(_decode(body))
        return messages


def send_blocking(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one message as a frame on a blocking socket."""
    sock.sendall(encode(message))


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of stream (the peer closed or died)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise WireError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return _decode(body)
