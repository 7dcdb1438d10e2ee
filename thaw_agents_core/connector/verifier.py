"""Checks every snapshot's chunk CRC32Cs once per process, before any request may load it.

Why the scheduler side checks too (the worker re-checks the bytes it copies): a load that fails
on the worker is reported to vLLM as a load error and recomputed, and on the CPU engine that
recovery is exact. On the H100 (vLLM 0.26, asynchronous scheduling on by default) a request
whose snapshot failed there produced different tokens than a cold run (seen 2026-11-23: one
flipped payload byte). So a snapshot is offered to vLLM only once its bytes are known good:

    scheduler: lookup -> match -> verdict(ref)
        unknown  -> start a background check, answer "ask again later" (vLLM re-queries the
                    request on its next step; other requests keep running)
        good     -> report the matched tokens (the worker copies and verifies again)
        bad      -> report no match: the request computes its prompt, and the store's other
                    snapshots are unaffected

A check reads the whole snapshot once on the CPU (multi-threaded CRC32C, ~6 GB/s per core).
Snapshots never change once published (a recycled shared-memory region carries a new id), so
a verdict per snapshot id holds for the life of the process.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from thaw_agents_core.snapshot.format import SnapshotError, check_chunk_crcs
from thaw_agents_core.store.base import SnapshotRef, SnapshotStore
from thaw_agents_core.transport.stream_scheduler import as_uint8_tensor
from thaw_kernels import chunk_crc32c

logger = logging.getLogger("thaw_agents.connector")


class SnapshotVerifier:
    """Verdicts (True good / False bad / None being checked) per snapshot id."""

    def __init__(self, store: Callable[[], SnapshotStore],
                 on_bad: Callable[[SnapshotRef, str], None] | None = None) -> None:
        self._store = store
        self._on_bad = on_bad
        self._verdicts: dict[str, bool | None] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="thaw-verify")

    def verdict(self, ref: SnapshotRef) -> bool | None:
        """The snapshot's verdict; None starts (or awaits) its background check."""
        if ref.snapshot_id not in self._verdicts:
            self._verdicts[ref.snapshot_id] = None
            self._pool.submit(self._check, ref)
        return self._verdicts[ref.snapshot_id]

    def _check(self, ref: SnapshotRef) -> None:
        reason = ""
        try:
            with self._store().open(ref) as view:
                header = view.header
                chunk_bytes = header.blocks_per_chunk * header.block_bytes
                crcs = chunk_crc32c(as_uint8_tensor(view.payload), chunk_bytes).tolist()
                check_chunk_crcs(header, crcs)
            good = True
        except (SnapshotError, LookupError, OSError, ValueError) as exc:
            good, reason = False, f"{type(exc).__name__}: {exc}"
        self._verdicts[ref.snapshot_id] = good
        if not good:
            logger.warning("thaw: snapshot %s is not loadable (%s); requests that start with "
                           "its prefix compute it instead", ref.snapshot_id, reason)
            if self._on_bad is not None:
                self._on_bad(ref, reason)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
