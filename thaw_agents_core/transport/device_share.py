"""A verified device copy of a snapshot, handed to another process GPU to GPU (CUDA IPC).

    owner (the parent: a HeldSnapshot, e.g. the prefetcher's)   importer (a worker, any GPU)
      share_held(held) -> descriptor (JSON) ------------------>   open_share(desc, namespace)
        {"kind": "thawkv-cuda-ipc", "snapshot_id",                  1. header: parsed and
         "header": the .thawkv header bytes (hex),                     validated in full, its id
         "payload": cuda_ipc entry of the payload (uint8)}             and namespace checked
                                                                    2. payload entry: uint8,
                                                                       1-D, contiguous, exactly
                                                                       payload_bytes
                                                                    3. one copy into its own
                                                                       device memory (peer copy
                                                                       across GPUs, over NVLink)
                                                                    4. every chunk's CRC32C on
                                                                       that copy, on the device
                                                                    -> HeldSnapshot:
                                                                       KVTransport.load_verified

Nothing of the owner's memory reaches a cache: the importer checks its own copy, so bytes that
change after the check cannot matter, and a bad chunk is SnapshotChecksumError (the caller
recomputes). Steps 1-2 run before CUDA is touched (testable and fuzzed on CPU). The owner keeps
the payload alive while importers may open it; the host path (stores) stays the fallback and
serves other hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from thaw_agents_core.snapshot.chunks import check_chunk_crcs
from thaw_agents_core.snapshot.errors import SnapshotFormatError, SnapshotMismatchError
from thaw_agents_core.snapshot.format import SnapshotHeader, encode_header, parse_header
from thaw_agents_core.snapshot.framing import MAX_HEADER_BYTES, PREFIX_BYTES, hex_bytes
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.transport import cuda_ipc
from thaw_agents_core.transport.prefetch import DevicePrefetcher, HeldSnapshot

KIND = "thawkv-cuda-ipc"
FIELDS = ("kind", "snapshot_id", "header", "payload")


@dataclass(frozen=True, slots=True)
class Share:
    """A validated descriptor: the snapshot's header and where its payload lies."""

    header: SnapshotHeader
    payload: cuda_ipc.CudaHandle


def share_held(held: HeldSnapshot) -> dict[str, Any]:
    """The descriptor of a verified device copy (see the module docstring)."""
    payload = held.payload
    if payload.dtype != torch.uint8 or payload.dim() != 1 or not payload.is_contiguous():
        raise ValueError("a shared payload must be a contiguous 1-D uint8 CUDA tensor")
    return {
        "kind": KIND,
        "snapshot_id": held.header.snapshot_id,
        "header": encode_header(held.header).hex(),
        "payload": cuda_ipc.export_tensor(payload),
    }


def parse_share(obj: Any, expect_namespace: Namespace | None = None) -> Share:
    """Validate a descriptor from another process (no CUDA call): SnapshotFormatError for a
    malformed one, SnapshotMismatchError for a snapshot of another engine."""
    if not isinstance(obj, dict) or set(obj) != set(FIELDS):
        raise SnapshotFormatError(f"a device share must be an object with exactly {list(FIELDS)}")
    if obj["kind"] != KIND:
        raise SnapshotFormatError(f"device share kind {obj['kind']!r:.60} is not {KIND!r}")
    text = obj["header"]
    limit = 2 * (PREFIX_BYTES + MAX_HEADER_BYTES + 4096)
    raw = hex_bytes(text) if isinstance(text, str) and len(text) <= limit else None
    if raw is None:
        raise SnapshotFormatError("device share: header must be the header's bytes in hex")
    header, _ = parse_header(raw)
    if header.snapshot_id != obj["snapshot_id"]:
        raise SnapshotFormatError(
            f"device share of {obj['snapshot_id']!r:.60} carries the header of "
            f"{header.snapshot_id!r}"
        )
    if expect_namespace is not None:
        diff = header.namespace.mismatches(expect_namespace)
        if diff:
            raise SnapshotMismatchError(diff)
    try:
        payload = cuda_ipc.parse_entry(obj["payload"])
    except ValueError as exc:
        raise SnapshotFormatError(f"device share: {exc}") from None
    if (
        payload.dtype != "uint8"
        or payload.shape != (header.payload_bytes,)
        or payload.stride != (1,)
    ):
        raise SnapshotFormatError(
            f"device share: the payload must be uint8[{header.payload_bytes}] with stride 1, "
            f"got {payload.dtype}{list(payload.shape)} stride {list(payload.stride)}"
        )
    return Share(header, payload)


def open_share(
    desc: Any,
    device: torch.device | str,
    expect_namespace: Namespace | None = None,
) -> HeldSnapshot:
    """Copy a shared snapshot into this process's memory on ``device`` and verify every chunk
    there; a :class:`HeldSnapshot` of the copy (raises SnapshotChecksumError on a bad chunk)."""
    share = desc if isinstance(desc, Share) else parse_share(desc, expect_namespace)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device shares move between CUDA devices, not to {device}")
    from thaw_kernels import chunk_crc32c

    began = time.perf_counter()
    header = share.header
    source = cuda_ipc.open_tensor(share.payload)
    copy = torch.empty(header.payload_bytes, dtype=torch.uint8, device=device)
    crcs: list[int] = []
    if header.payload_bytes:
        with torch.cuda.device(device):
            copy.copy_(source)  # same GPU: device to device; another: a peer copy over the link
            crcs = chunk_crc32c(copy, header.blocks_per_chunk * header.block_bytes).tolist()
    del source  # the owner's memory is not needed any more
    if len(crcs) != header.num_chunks:
        raise SnapshotFormatError(f"{len(crcs)} chunk CRCs for {header.num_chunks} chunks")
    check_chunk_crcs(header, crcs)
    return HeldSnapshot(header, copy, time.perf_counter() - began)


def adopt_share(prefetcher: DevicePrefetcher, desc: Any) -> bool:
    """Open a share on the prefetcher's device, checked against its engine's namespace, and
    hold the verified copy there for the loads that follow; False when it was not adopted
    (another namespace, no room). Raises what ``open_share`` raises."""
    held = open_share(desc, prefetcher.device, prefetcher.namespace())
    return prefetcher.adopt(held)
