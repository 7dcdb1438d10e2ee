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
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.snapshot_format import Namespace, SnapshotView, parse_snapshot, open_snapshot_file
from thaw_agents_core.snapshot_format import read_snapshot_header

_RACY_NS = 50_000_000  # 50 ms: well above the coarse clock tick of directory timestamps
_KEY_RE = re.compile(r"[0-9a-f]{8,64}")


class SnapshotNotFoundError(LookupError):
    """The referenced snapshot is not (or no longer) in the store."""


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    namespace_key: str
    snapshot_id: str


@dataclass(frozen=True, slots=True)
class Match:
    """Result of :meth:`SnapshotStore.lookup`: ``ref`` holds the first ``num_blocks`` blocks."""

    ref: SnapshotRef
    num_blocks: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    ref: SnapshotRef
    num_blocks: int
    total_bytes: int
    created_unix: float
    block_hashes: tuple[bytes, ...] = field(repr=False)


def check_key(value: str, what: str = "namespace_key") -> str:
    """Keys and snapshot ids become path components: lowercase hex only."""
    if not isinstance(value, str) or _KEY_RE.fullmatch(value) is None:
        raise ValueError(f"{what} must be 8-64 lowercase hex chars (e.g. Namespace.key()), got {value!r}")
    return value


def touch(path: str) -> None:
    """Mark ``path`` as just used (LRU clock). Does not change its directory's mtime."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


def _proc_start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


def process_token() -> tuple[int, int]:
    """(pid, start time): names this process even after its pid is recycled."""
    return os.getpid(), _proc_start_ticks(os.getpid()) or 0


def process_alive(pid: int, start_ticks: int) -> bool:
    ticks = _proc_start_ticks(pid)
    if ticks is None:  # no /proc: fall back to the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc")
    return ticks == start_ticks


@contextmanager
def flocked(path: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing); released on exit or process death."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    def abort(self) -> None: ...

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
            info = SnapshotInfo(ref, h.num_blocks, view.total_bytes, h.created_unix, tuple(h.block_hashes))
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
    def reserve(self, nbytes: int) -> Reservation: ...

    @abstractmethod
    def open(self, ref: SnapshotRef, *, expect_namespace: Namespace | None = None) -> SnapshotView:
        """A validated view (CRCs are the reader's job: ``verify_chunks``); raises
        :class:`SnapshotNotFoundError` when the snapshot is gone."""

    @abstractmethod
    def delete(self, ref: SnapshotRef) -> bool: ...

    def close(self) -> None:
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
        return sorted(self._refresh(namespace_key).entries.values(), key=lambda i: i.created_unix)

    def info(self, ref: SnapshotRef) -> SnapshotInfo:
        found = self._refresh(ref.namespace_key).entries.get(ref.snapshot_id)
        if found is None:
            raise SnapshotNotFoundError(f"snapshot {ref.snapshot_id} is not in namespace {ref.namespace_key}")
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


class _FileReservation(Reservation):
    def __init__(self, store: FileStore, nbytes: int):
        self.store, self.nbytes = store, nbytes
        pid, start = process_token()
        self.tmp_path = os.path.join(store.tmp_dir, f"{pid}-{start}-{secrets.token_hex(8)}.partial")
        fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:  # allocate now: a full disk fails here, not with SIGBUS on a sparse mmap later
            os.posix_fallocate(fd, 0, nbytes)
            self._mm = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(self.tmp_path)
            raise
        finally:
            os.close(fd)
        self.buffer = memoryview(self._mm)

    def commit(self, namespace_key: str | None = None) -> SnapshotRef:
        ref, info = self._validated(namespace_key)
        self._mm.flush()
        self.buffer.release()
        try:
            self._mm.close()
        except BufferError:  # views of the buffer still live: fine unless the file must shrink
            if info.total_bytes != self.nbytes:
                self.buffer = memoryview(self._mm)
                raise RuntimeError(
                    f"the reservation ({self.nbytes} bytes) is larger than the snapshot ({info.total_bytes}): "
                    "release every view of Reservation.buffer (slices, numpy/torch tensors) before commit()"
                ) from None
        if info.total_bytes != self.nbytes:
            os.truncate(self.tmp_path, info.total_bytes)
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        self.store._install(self.tmp_path, ref, info.total_bytes)
        self.done = True
        return ref

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.buffer.release()
        try:
            self._mm.close()
        except BufferError:
            pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


class FileStore(SnapshotStore):
    """Durable snapshots in a directory (local disk or a shared file system)::

        root/.lock                               flock: eviction + install
        root/.tmp/<pid>-<start>-<rand>.partial   reservations being written (reclaimed when the pid died)
        root/<namespace_key>/<snapshot_id>.thawkv

    Publishing renames a complete, fsynced file into place: visible all-or-nothing. ``open``
    mmaps read-only; an evicted (unlinked) file stays readable through existing maps. With
    ``max_bytes``, installing a snapshot first removes least-recently-used files until the
    total fits.
    """

    SUFFIX = ".thawkv"

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int | None = None):
        super().__init__()
        self.root = os.path.abspath(os.fspath(root))
        self.max_bytes = max_bytes
        self.tmp_dir = os.path.join(self.root, ".tmp")
        self.lock_path = os.path.join(self.root, ".lock")
        os.makedirs(self.tmp_dir, exist_ok=True)
        for name in os.listdir(self.tmp_dir):
            parts = name.split("-")
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                if not process_alive(int(parts[0]), int(parts[1])):
                    try:
                        os.unlink(os.path.join(self.tmp_dir, name))
                    except FileNotFoundError:
                        pass

    def __repr__(self) -> str:
        return f"FileStore({self.root!r}, max_bytes={self.max_bytes})"

    def _namespace_dir(self, namespace_key: str) -> str:
        return os.path.join(self.root, namespace_key)

    def _entry_id(self, filename: str) -> str | None:
        if filename.endswith(self.SUFFIX) and not filename.startswith("."):
            return filename[: -len(self.SUFFIX)]
        return None

    def path_of(self, ref: SnapshotRef) -> str:
        check_key(ref.namespace_key)
        check_key(ref.snapshot_id, "snapshot_id")
        return os.path.join(self.root, ref.namespace_key, ref.snapshot_id + self.SUFFIX)

    def _load_entry(self, namespace_key: str, snapshot_id: str) -> SnapshotInfo:
        ref = SnapshotRef(namespace_key, snapshot_id)
        header, size = read_snapshot_header(self.path_of(ref))
        if header.snapshot_id != snapshot_id or header.namespace.key() != namespace_key:
            raise ValueError(f"{self.path_of(ref)} holds snapshot {header.snapshot_id} of another name")
        return SnapshotInfo(ref, header.num_blocks, size, header.created_unix, tuple(header.block_hashes))

    def reserve(self, nbytes: int) -> Reservation:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise ValueError(
                f"snapshot needs {nbytes} bytes but {self!r} holds at most max_bytes={self.max_bytes}; "
                "raise max_bytes"
            )
        return _FileReservation(self, nbytes)

    def _install(self, tmp_path: str, ref: SnapshotRef, nbytes: int) -> None:
        final = self.path_of(ref)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with flocked(self.lock_path):
            if self.max_bytes is not None:
                self._evict_to_fit(nbytes)
            os.replace(tmp_path, final)
            touch(final)
        dfd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _evict_to_fit(self, nbytes: int) -> None:
        files = []
        for ns in os.listdir(self.root):
            if ns.startswith("."):
                continue
            d = os.path.join(self.root, ns)
            for name in os.listdir(d) if os.path.isdir(d) else ():
                if self._entry_id(name) is not None:
                    try:
                        st = os.stat(os.path.join(d, name))
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime_ns, name, st.st_size, os.path.join(d, name)))
        used = sum(f[2] for f in files)
        for _, _, size, path in sorted(files):  # least recently used first
            if used + nbytes <= self.max_bytes:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            used -= size

    def open(self, ref: SnapshotRef, *, expect_namespace: Namespace | None = None) -> SnapshotView:
        path = self.path_of(ref)
        try:
            view = open_snapshot_file(path, expect_namespace=expect_namespace)
        except FileNotFoundError:
            raise SnapshotNotFoundError(f"snapshot {ref.snapshot_id} not found in {self!r} ({path})") from None
        if view.header.snapshot_id != ref.snapshot_id:
            view.close()
            raise ValueError(f"{path} holds snapshot {view.header.snapshot_id}, not {ref.snapshot_id}")
        touch(path)
        return view

    def delete(self, ref: SnapshotRef) -> bool:
        try:
            os.unlink(self.path_of(ref))
            return True
        except FileNotFoundError:
            return False


_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"64MiB"``, ``"2g"``, ``"4096"`` -> bytes (k/m/g/t are binary: 1k = 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad size {text!r}: use e.g. 4096, 64MiB, 2GiB")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def attach_url(url: str) -> str:
    """The URL an engine process uses: it attaches to a shared-memory store, never creates one
    (the store's owner is the user's process, which outlives its engines)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "shm":
        return url
    query = dict(urllib.parse.parse_qsl(parsed.query))
    query["create"] = "false"
    query.pop("capacity", None)
    return urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(query)))


def open_store(url: str | os.PathLike[str]) -> SnapshotStore:
    """``shm://NAME?capacity=1GiB[&create=true|false]``, ``file:///PATH[?max_bytes=...]`` or a path.

    For ``shm://`` without ``create``: attach if the store exists, else create it (needs capacity).
    """
    text = os.fspath(url)
    parsed = urllib.parse.urlsplit(text)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    if parsed.scheme == "shm":
        from thaw_agents_core.shm_store import ShmStore

        create = {"true": True, "false": False, None: None}.get(query.get("create"), "bad")
        if create == "bad":
            raise ValueError(f"bad create={query['create']!r} in {text!r}: use true or false")
        cap = parse_size(query["capacity"]) if "capacity" in query else None
        return ShmStore(parsed.netloc, cap, create=create)
    if parsed.scheme == "file":
        max_bytes = parse_size(query["max_bytes"]) if "max_bytes" in query else None
        return FileStore(urllib.parse.unquote(parsed.path), max_bytes=max_bytes)
    if parsed.scheme and len(parsed.scheme) > 1:  # (one letter: a Windows drive)
        raise ValueError(
            f"unsupported store URL {text!r}: use shm://NAME?capacity=1GiB, file:///PATH or a plain path"
        )
    return FileStore(text)
