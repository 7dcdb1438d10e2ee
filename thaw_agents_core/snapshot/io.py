"""Writing and reading ``.thawkv`` files; the format itself is :mod:`.format`.

Writing is two-phase, so the payload can land first (a GPU gather straight into shared memory)
and the header last::

    plan = plan_snapshot(namespace, token_ids, block_bytes)    header size fixed now
    buf = store.reserve(plan.total_bytes).buffer                 (or a bytearray)
    plan.payload_view(buf)[:] = kv_bytes                         payload first
    plan.finish(buf)                                             chunk CRCs + header last

:func:`build_snapshot` does all of it into a bytearray; :func:`write_snapshot_file` puts bytes
on disk atomically; :func:`read_snapshot_header` indexes a file without reading its payload;
:func:`open_snapshot_file` mmaps one read-only and validates it.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from thaw_agents_core.snapshot.block_hashes import block_hash_chain
from thaw_agents_core.snapshot.chunks import compute_chunk_crcs, default_blocks_per_chunk
from thaw_agents_core.snapshot.errors import SnapshotFormatError
from thaw_agents_core.snapshot.format import (
    _HEX_ID,
    MAGIC,
    MAX_EXTRA_DEPTH,
    SnapshotHeader,
    SnapshotView,
    encode_header,
    json_nesting,
    parse_header,
    parse_snapshot,
)
from thaw_agents_core.snapshot.framing import (
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    as_bytes_view,
    is_int,
    short,
)
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.util.files import atomic_replace


@dataclass(slots=True)
class SnapshotPlan:
    """Two-phase writing: reserve ``total_bytes``, fill ``payload_view(dest)``, then ``finish``.

    The header's size is fixed at plan time (CRCs are fixed-width hex), so the payload can be
    written first (e.g. by a GPU gather straight into shared memory) and the header last.
    """

    header: SnapshotHeader  # chunk_crc32c are placeholders until finish()
    payload_offset: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of the payload (the header's ``payload_bytes``)."""
        return self.header.payload_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes to reserve for the whole snapshot: header region plus payload."""
        return self.payload_offset + self.header.payload_bytes

    def payload_view(self, dest: Any) -> memoryview:
        """The writable payload region of ``dest`` (a buffer of at least total_bytes)."""
        mv = self._dest(dest)
        return mv[self.payload_offset : self.total_bytes]

    def _dest(self, dest: Any) -> memoryview:
        mv = as_bytes_view(dest)
        if mv.readonly or len(mv) < self.total_bytes:
            raise ValueError(
                f"destination must be a writable buffer of at least {self.total_bytes} bytes, "
                f"got {len(mv)} bytes{' (read-only)' if mv.readonly else ''}"
            )
        return mv

    def finish(self, dest: Any, chunk_crcs: Sequence[int] | None = None) -> SnapshotHeader:
        """Write the header into ``dest[:payload_offset]``; CRCs are computed here unless given."""
        mv = self._dest(dest)
        h = self.header
        if chunk_crcs is None:
            chunk_crcs = compute_chunk_crcs(
                self.payload_view(mv), h.block_bytes, h.blocks_per_chunk
            )
        crcs = [int(c) for c in chunk_crcs]
        if len(crcs) != h.num_chunks or any(not 0 <= c < 2**32 for c in crcs):
            raise ValueError(
                f"need {h.num_chunks} chunk CRCs in [0, 2**32), got {len(crcs)}: {short(crcs)}"
            )
        final = dataclasses.replace(h, chunk_crc32c=crcs)
        prefix = encode_header(final)
        if len(prefix) != self.payload_offset:  # cannot happen: CRCs are fixed-width
            raise AssertionError(f"header grew from {self.payload_offset} to {len(prefix)} bytes")
        mv[: self.payload_offset] = prefix
        return final


def plan_snapshot(
    namespace: Namespace,
    token_ids: Sequence[int],
    block_bytes: int,
    *,
    blocks_per_chunk: int | None = None,
    snapshot_id: str | None = None,
    created_unix: float | None = None,
    hash_salt: bytes = b"",
    extra: dict[str, Any] | None = None,
) -> SnapshotPlan:
    """Plan a snapshot of ``token_ids`` (whole blocks only) whose blocks are ``block_bytes`` each."""
    tokens = [int(t) for t in token_ids]
    bs = namespace.block_size
    if not tokens or len(tokens) % bs:
        full = len(tokens) // bs * bs
        raise ValueError(
            f"token_ids has {len(tokens)} tokens, not a positive multiple of block_size {bs}: "
            f"pass only the full blocks (token_ids[:{full}])"
        )
    if not is_int(block_bytes) or block_bytes <= 0:
        raise ValueError(f"block_bytes must be a positive int, got {block_bytes!r}")
    bpc = default_blocks_per_chunk(block_bytes) if blocks_per_chunk is None else blocks_per_chunk
    if not is_int(bpc) or bpc <= 0:
        raise ValueError(f"blocks_per_chunk must be a positive int, got {bpc!r}")
    sid = secrets.token_hex(16) if snapshot_id is None else snapshot_id
    if not isinstance(sid, str) or _HEX_ID.fullmatch(sid) is None:
        raise ValueError(f"snapshot_id must be 8-64 lowercase hex chars, got {sid!r}")
    if json_nesting(extra or {}) > MAX_EXTRA_DEPTH:
        raise ValueError(
            f"extra nests more than MAX_EXTRA_DEPTH = {MAX_EXTRA_DEPTH} deep: "
            "readers refuse such a header"
        )
    try:
        json.dumps(extra or {})
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serialisable: {e}") from None
    hashes = block_hash_chain(tokens, bs, hash_salt)
    header = SnapshotHeader(
        snapshot_id=sid, namespace=namespace, token_ids=tokens, block_hashes=hashes,
        block_bytes=block_bytes, blocks_per_chunk=bpc,
        chunk_crc32c=[0] * -(-len(hashes) // bpc),
        created_unix=round(time.time(), 3) if created_unix is None else created_unix,
        hash_salt=bytes(hash_salt), extra=dict(extra or {}),
    )  # fmt: skip
    return SnapshotPlan(header, len(encode_header(header)))


def build_snapshot(
    namespace: Namespace, token_ids: Sequence[int], block_bytes: int, payload: Any, **kwargs: Any
) -> bytearray:
    """One-shot form of :func:`plan_snapshot`: the complete ``.thawkv`` bytes."""
    plan = plan_snapshot(namespace, token_ids, block_bytes, **kwargs)
    src = as_bytes_view(payload)
    if len(src) != plan.payload_bytes:
        raise ValueError(
            f"payload is {len(src)} bytes, expected num_blocks * block_bytes = "
            f"{plan.header.num_blocks} * {block_bytes} = {plan.payload_bytes}"
        )
    out = bytearray(plan.total_bytes)
    plan.payload_view(out)[:] = src
    plan.finish(out)
    return out


def write_snapshot_file(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write ``data`` to ``path`` (:func:`~thaw_agents_core.files.atomic_replace`):
    readers see the old file or the new one, never a partial one."""
    with atomic_replace(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def read_snapshot_header(path: str | os.PathLike[str]) -> tuple[SnapshotHeader, int]:
    """Validate and return (header, file size) reading only the header bytes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(PREFIX_BYTES)
        if len(prefix) == PREFIX_BYTES and prefix[:8] == MAGIC:
            (hl,) = struct.unpack_from("<Q", prefix, 8)
            if hl <= MAX_HEADER_BYTES:
                prefix += f.read(hl)
        header, payload_offset = parse_header(prefix)
    if size < payload_offset + header.payload_bytes:
        raise SnapshotFormatError(
            f"truncated snapshot: payload needs bytes [{payload_offset}, "
            f"{payload_offset + header.payload_bytes}) but the file has {size} bytes"
        )
    return header, size


def open_snapshot_file(
    path: str | os.PathLike[str],
    *,
    expect_namespace: Namespace | None = None,
    on_prefix: Callable[[memoryview, int], None] | None = None,
) -> SnapshotView:
    """mmap ``path`` read-only and validate it (``on_prefix``: see :func:`parse_snapshot`);
    ``view.close()`` unmaps."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise SnapshotFormatError(f"truncated snapshot: {os.fspath(path)} is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = parse_snapshot(mm, expect_namespace=expect_namespace, on_prefix=on_prefix)
    except BaseException:
        try:
            mm.close()
        except BufferError:  # the traceback still references a view of it; the GC unmaps
            pass
        raise
    view.owner = mm
    return view
