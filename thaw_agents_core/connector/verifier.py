"""The scheduler side's check of a snapshot before it offers the snapshot to vLLM.

    scheduler: lookup -> match -> SnapshotVerifier.verdict(ref, num_blocks, last_hash)
        header (parsed once per snapshot id, ~1.5 ms at 8192 tokens): it must parse and
        validate, its namespace must equal this engine's (model, weights version, dtypes,
        layout, block size, vLLM version), it must hold the matched blocks, and its
        block-hash chain must end in the hash the request computed
        payload (only where ``check_payload``): every chunk's CRC32C, once per snapshot id, in
        a background thread; until it is done the verdict is None and vLLM asks again on a
        later step (other requests keep running). Where this process holds the engine's
        worker (one GPU) the check is its DevicePrefetcher's (transport/prefetch.py): the
        payload is copied to the device and checked there, and the load that follows
        scatters that copy; else (or when the copy does not fit) a host CRC pass
        -> True: report the matched tokens; False: report no match (the request computes its
           prompt; the store's other snapshots are unaffected)

Either way the worker side checks every chunk's CRC32C again where it copies it
(``transport.kv.KVTransport.load``: on the device on CUDA, on the copy path on the CPU) before
scattering it, and a bad chunk is reported to vLLM as a load error, which recomputes.

Why the payload pass exists on CUDA only: vLLM's recompute after a reported load error is
exact on the CPU engine (float32 tiny model: the corrupted-snapshot test equals a cold run),
but not on CUDA: on the H200 (vLLM 0.26, 8B shapes, bf16, 2026-12-01) a branch whose load
failed its checksums produced other tokens than a cold run, with asynchronous scheduling on and
off alike (first token 19025 vs 109149; the H100 showed the same on 2026-11-23). There a
snapshot is offered only once its bytes are known good, which costs the first request of each
snapshot one host CRC pass (1040 tokens: TTFT 32.4 ms vs 28.2 recomputing on the H200) and
catches corruption before vLLM's recompute path is ever needed.

Snapshots never change once published (a recycled shared-memory region carries a new id), so a
verdict per snapshot id holds for the life of the process.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from thaw_agents_core.snapshot.chunks import check_chunk_crcs
from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import SnapshotRef, SnapshotStore
from thaw_agents_core.transport.prefetch import DevicePrefetcher
from thaw_agents_core.transport.stream_scheduler import as_uint8_tensor
from thaw_kernels import chunk_crc32c

logger = logging.getLogger("thaw_agents.connector")


@dataclass(frozen=True, slots=True)
class _HeaderFacts:
    num_blocks: int
    block_hashes_hex: tuple[str, ...]


class SnapshotVerifier:
    """Verdicts per snapshot id: header facts (None: refused), and with ``check_payload`` the
    background payload check (True good / False bad / None being checked)."""

    def __init__(
        self,
        store: Callable[[], SnapshotStore],
        namespace: Namespace,
        on_bad: Callable[[SnapshotRef, str], None] | None = None,
        *,
        check_payload: bool = False,
        prefetcher: Callable[[], DevicePrefetcher | None] = lambda: None,
    ) -> None:
        self._store = store
        self._namespace = namespace
        self._on_bad = on_bad
        self.check_payload = check_payload
        self._prefetcher = prefetcher
        self._facts: dict[str, _HeaderFacts | None] = {}
        self._payload: dict[str, bool | None] = {}
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="thaw-verify") if check_payload else None
        )

    def verdict(self, ref: SnapshotRef, num_blocks: int, last_hash_hex: str) -> bool | None:
        """Whether the snapshot may be loaded for its first ``num_blocks`` blocks by a request
        whose block-hash chain ends (at block ``num_blocks - 1``) in ``last_hash_hex``; None
        while its payload is being checked (ask again on a later step)."""
        if ref.snapshot_id not in self._facts:
            self._facts[ref.snapshot_id] = self._read_header(ref)
        facts = self._facts[ref.snapshot_id]
        if (
            facts is None
            or not 0 < num_blocks <= facts.num_blocks
            or facts.block_hashes_hex[num_blocks - 1] != last_hash_hex
        ):
            return False
        if self._pool is None:
            return True
        known = self._payload.get(ref.snapshot_id)
        if known is not None:
            return known
        prefetcher = self._prefetcher()
        if prefetcher is not None and ref.snapshot_id not in self._payload:
            status = prefetcher.status(ref)  # copied to the device and checked there
            if status is False:
                self._payload[ref.snapshot_id] = False
                self._refuse(ref, SnapshotError(prefetcher.reason(ref) or "bad payload"))
                return False
            if status != "host":
                return status
        if ref.snapshot_id not in self._payload:
            self._payload[ref.snapshot_id] = None
            self._pool.submit(self._check_payload, ref)
        return self._payload[ref.snapshot_id]

    def _refuse(self, ref: SnapshotRef, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "thaw: snapshot %s is not loadable (%s); requests that start with its "
            "prefix compute it instead",
            ref.snapshot_id,
            reason,
        )
        if self._on_bad is not None:
            self._on_bad(ref, reason)

    def _read_header(self, ref: SnapshotRef) -> _HeaderFacts | None:
        try:
            with self._store().open(ref, expect_namespace=self._namespace) as view:
                header = view.header
                return _HeaderFacts(header.num_blocks, tuple(h.hex() for h in header.block_hashes))
        except (SnapshotError, LookupError, OSError, ValueError) as exc:
            self._refuse(ref, exc)
            return None

    def _check_payload(self, ref: SnapshotRef) -> None:
        try:
            with self._store().open(ref) as view:
                header = view.header
                chunk_bytes = header.blocks_per_chunk * header.block_bytes
                crcs = chunk_crc32c(as_uint8_tensor(view.payload), chunk_bytes).tolist()
                check_chunk_crcs(header, crcs)
            self._payload[ref.snapshot_id] = True
        except (SnapshotError, LookupError, OSError, ValueError) as exc:
            self._payload[ref.snapshot_id] = False
            self._refuse(ref, exc)

    def close(self) -> None:
        """Stop the background checks and forget every verdict."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._facts.clear()
        self._payload.clear()
