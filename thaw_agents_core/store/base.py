"""Snapshot stores: publish ``.thawkv`` snapshots under a namespace, find the longest shared prefix.

Every store keeps one directory per namespace key whose entries are its snapshots (files for
:class:`FileStore`, descriptors for ``ShmStore``). Lookup sits on vLLM's scheduler hot path, so
the index is cached per process:

    lookup(ns, chain) -> stat(ns dir)           one syscall; unchanged mtime -> cached index
                      -> chain[0] in by_hash?   a miss ends here (microseconds)
                      -> binary search on k     "chain[k-1] in by_hash" is monotone in k,
                                                because h_k commits to blocks 0..k

``by_hash`` maps every block hash of every snapshot to the snapshots holding it at that
position. A changed directory is re-listed and only new entries are read. Directory mtimes tick
with the kernel's coarse clock (~4 ms), so an mtime younger than ``_RACY_NS`` is not trusted:
the next lookup re-lists (git's "racy clean" rule).

Entry mtimes double as the cross-process LRU clock: publish and open() set them to now;
eviction removes the oldest first.

Backends: :mod:`.file` (durable files) and :mod:`.shm` (one host, shared memory);
:func:`~thaw_agents_core.store.url.open_store` opens either from a URL.
"""

from __future__ import annotations

import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.snapshot.format import SnapshotView, parse_snapshot
from thaw_agents_core.snapshot.namespace import Namespace

PrefixHook = Callable[[memoryview, int], None]
_RACY_NS = 50_000_000  # 50 ms: well above the coarse clock tick of directory timestamps
_KEY_RE = re.compile(r"[0-9a-f]{8,64}")


class SnapshotNotFoundError(LookupError):
    """The referenced snapshot is not (or no longer) in the store."""


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """Names one published snapshot: its namespace key and snapshot id."""

    namespace_key: str
    snapshot_id: str


@dataclass(frozen=True, slots=True)
class Match:
    """Result of :meth:`SnapshotStore.lookup`: ``ref`` holds the first ``num_blocks`` blocks."""

    ref: SnapshotRef
    num_blocks: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One indexed snapshot: its ref, size (blocks, bytes), creation time and block hashes."""

    ref: SnapshotRef
    num_blocks: int
    total_bytes: int
    created_unix: float
    block_hashes: tuple[bytes, ...] = field(repr=False)


def check_key(value: str, what: str = "namespace_key") -> str:
    """Keys and snapshot ids become path components: lowercase hex only."""
    if not isinstance(value, str) or _KEY_RE.fullmatch(value) is None:
        raise ValueError(
            f"{what} must be 8-64 lowercase hex chars (e.g. Namespace.key()), got {value!r}"
        )
    return value


@dataclass(slots=True)
class _NamespaceIndex:
    directory: str
    mtime_ns: int = -1
    trusted: bool = False  # mtime old enough that a later change must move it
    entries: dict[str, SnapshotInfo] = field(default_factory=dict)  # by snapshot_id
    by_hash: dict[bytes, dict[str, int]] = field(default_factory=dict)  # hash -> {id: position}
    unreadable: set[str] = field(default_factory=set)  # entry names that failed to load

    def add(self, info: SnapshotInfo) -> None:
        sid = info.ref.snapshot_id
        self.entries[sid] = info
        for i, h in enumerate(info.block_hashes):
            self.by_hash.setdefault(h, {})[sid] = i

    def remove(self, sid: str) -> None:
        info = self.entries.pop(sid, None)
        if info is None:
            return
        for h in info.block_hashes:
            holders = self.by_hash.get(h)
            if holders is not None:
                holders.pop(sid, None)
                if not holders:
                    del self.by_hash[h]


class Reservation(ABC):
    """A writable region for one snapshot. Fill ``buffer`` with the complete ``.thawkv`` bytes
    (e.g. ``plan.payload_view(r.buffer)`` then ``plan.finish(r.buffer)``), then ``commit()``.
    Until commit the snapshot is invisible; ``abort()`` (or leaving a ``with`` block on an
    exception) frees the region."""

    buffer: memoryview
    nbytes: int
    done: bool = False

    @abstractmethod
    def commit(self, namespace_key: str | None = None) -> SnapshotRef:
        """Validate the buffer (not CRCs) and publish atomically; ``namespace_key`` is checked
        against the header's namespace when given."""

    @abstractmethod
    def abort(self) -> None:
        """Free the region without publishing (no-op once committed or aborted)."""

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if not self.done:
            self.abort()

    def _validated(self, namespace_key: str | None) -> tuple[SnapshotRef, SnapshotInfo]:
        if self.done:
            raise RuntimeError("reservation already committed or aborted")
        view = parse_snapshot(self.buffer)
        try:
            h = view.header
            key = h.namespace.key()
            if namespace_key is not None and namespace_key != key:
                raise ValueError(
                    f"commit({namespace_key!r}) but the snapshot's namespace key is {key!r}"
                )
            ref = SnapshotRef(key, h.snapshot_id)
            info = SnapshotInfo(
                ref, h.num_blocks, view.total_bytes, h.created_unix, tuple(h.block_hashes)
            )
            return ref, info
        finally:
            view.payload.release()


class SnapshotStore(ABC):
    """Common interface and the cached, longest-prefix index."""

    def __init__(self) -> None:
        self._indexes: dict[str, _NamespaceIndex] = {}
        self._refresh_lock = threading.Lock()  # slow path only; the hot path takes no lock

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _namespace_dir(self, namespace_key: str) -> str: ...

    @abstractmethod
    def _entry_id(self, filename: str) -> str | None:
        """Snapshot id of a directory entry, or None for anything else (temp files...)."""

    @abstractmethod
    def _load_entry(self, namespace_key: str, snapshot_id: str) -> SnapshotInfo: ...

    @abstractmethod
    def reserve(self, nbytes: int) -> Reservation:
        """A writable region of ``nbytes`` bytes for one new snapshot (see :class:`Reservation`)."""

    @abstractmethod
    def open(
        self,
        ref: SnapshotRef,
        *,
        expect_namespace: Namespace | None = None,
        on_prefix: PrefixHook | None = None,
    ) -> SnapshotView:
        """A validated view (CRCs are the reader's job: ``verify_chunks``); raises
        :class:`SnapshotNotFoundError` when the snapshot is gone. ``on_prefix``: see
        :func:`~thaw_agents_core.snapshot.format.parse_snapshot`."""

    @abstractmethod
    def delete(self, ref: SnapshotRef) -> bool:
        """Remove the snapshot; False if it was not there."""

    def close(self) -> None:
        """Drop the cached indexes (backends also release their files or mappings)."""
        self._indexes.clear()

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- common --------------------------------------------------------------------------
    def publish_bytes(self, namespace_key: str | None, data: Any) -> SnapshotRef:
        """Publish complete ``.thawkv`` bytes (copied into a fresh reservation)."""
        src = memoryview(data).cast("B")
        with self.reserve(len(src)) as r:
            r.buffer[: len(src)] = src
            return r.commit(namespace_key)

    def lookup(
        self, namespace_key: str, block_hashes: Sequence[bytes], max_blocks: int | None = None
    ) -> Match | None:
        """The snapshot sharing the longest block prefix with ``block_hashes`` (None: no block).

        ``block_hashes`` is ``block_hash_chain(prompt_tokens, block_size, salt)``. The snapshot
        may be evicted before ``open()``, which then raises :class:`SnapshotNotFoundError`:
        treat that as a miss.
        """
        idx = self._refresh(namespace_key)
        by_hash = idx.by_hash
        n = len(block_hashes) if max_blocks is None else min(len(block_hashes), max_blocks)
        if n <= 0 or block_hashes[0] not in by_hash:
            return None
        lo, hi = 1, n  # chain[lo-1] is indexed; answer in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if block_hashes[mid - 1] in by_hash:
                lo = mid
            else:
                hi = mid - 1
        holders = by_hash[block_hashes[lo - 1]]
        for sid in reversed(holders):  # newest first
            if holders[sid] == lo - 1:
                return Match(SnapshotRef(namespace_key, sid), lo)
        return None

    def list(self, namespace_key: str) -> list[SnapshotInfo]:
        """Every snapshot in the namespace, oldest first."""
        return sorted(self._refresh(namespace_key).entries.values(), key=lambda i: i.created_unix)

    def info(self, ref: SnapshotRef) -> SnapshotInfo:
        """The index entry of ``ref``; raises :class:`SnapshotNotFoundError` when it is gone."""
        found = self._refresh(ref.namespace_key).entries.get(ref.snapshot_id)
        if found is None:
            raise SnapshotNotFoundError(
                f"snapshot {ref.snapshot_id} is not in namespace {ref.namespace_key}"
            )
        return found

    def _refresh(self, namespace_key: str) -> _NamespaceIndex:
        idx = self._indexes.get(namespace_key)
        if idx is None:
            check_key(namespace_key)
            idx = self._indexes[namespace_key] = _NamespaceIndex(self._namespace_dir(namespace_key))
        try:
            mtime = os.stat(idx.directory).st_mtime_ns
        except FileNotFoundError:
            if idx.mtime_ns != -1:
                self._indexes[namespace_key] = idx = _NamespaceIndex(idx.directory)
            return idx
        if mtime == idx.mtime_ns and idx.trusted:
            return idx
        with self._refresh_lock:
            return self._rescan(idx, mtime, namespace_key)

    def _rescan(self, idx: _NamespaceIndex, mtime: int, namespace_key: str) -> _NamespaceIndex:
        directory = idx.directory
        names = {}
        for name in os.listdir(directory):
            sid = self._entry_id(name)
            if sid is not None:
                names[sid] = name
        for sid in [s for s in idx.entries if s not in names]:
            idx.remove(sid)
        idx.unreadable &= set(names)
        for sid in names.keys() - idx.entries.keys() - idx.unreadable:
            try:
                idx.add(self._load_entry(namespace_key, sid))
            except FileNotFoundError:  # deleted between listdir and read
                pass
            except (ValueError, TypeError, KeyError, OSError):  # corrupt: skip it, never serve it
                idx.unreadable.add(sid)
        idx.mtime_ns = mtime
        idx.trusted = time.time_ns() - mtime > _RACY_NS
        return idx
