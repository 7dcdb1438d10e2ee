"""FileStore: durable ``.thawkv`` snapshots in a directory (local disk or a shared file system)."""

from __future__ import annotations

import mmap
import os
import secrets

from thaw_agents_core.snapshot.format import SnapshotView
from thaw_agents_core.snapshot.io import open_snapshot_file, read_snapshot_header
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import (
    PrefixHook,
    Reservation,
    SnapshotInfo,
    SnapshotNotFoundError,
    SnapshotRef,
    SnapshotStore,
    check_key,
)
from thaw_agents_core.util.files import flocked, fsync_directory, touch, unlink_if_exists
from thaw_agents_core.util.process_identity import process_alive, process_token


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
        unlink_if_exists(self.tmp_path)


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
                    unlink_if_exists(os.path.join(self.tmp_dir, name))

    def __repr__(self) -> str:
        return f"FileStore({self.root!r}, max_bytes={self.max_bytes})"

    def _namespace_dir(self, namespace_key: str) -> str:
        return os.path.join(self.root, namespace_key)

    def _entry_id(self, filename: str) -> str | None:
        if filename.endswith(self.SUFFIX) and not filename.startswith("."):
            return filename[: -len(self.SUFFIX)]
        return None

    def path_of(self, ref: SnapshotRef) -> str:
        """Path of the snapshot's file: ``<root>/<namespace_key>/<snapshot_id>.thawkv``."""
        check_key(ref.namespace_key)
        check_key(ref.snapshot_id, "snapshot_id")
        return os.path.join(self.root, ref.namespace_key, ref.snapshot_id + self.SUFFIX)

    def _load_entry(self, namespace_key: str, snapshot_id: str) -> SnapshotInfo:
        ref = SnapshotRef(namespace_key, snapshot_id)
        header, size = read_snapshot_header(self.path_of(ref))
        if header.snapshot_id != snapshot_id or header.namespace.key() != namespace_key:
            raise ValueError(
                f"{self.path_of(ref)} holds snapshot {header.snapshot_id} of another name"
            )
        return SnapshotInfo(
            ref, header.num_blocks, size, header.created_unix, tuple(header.block_hashes)
        )

    def reserve(self, nbytes: int) -> Reservation:
        """A preallocated temp file of ``nbytes`` (ValueError over ``max_bytes``)."""
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
        fsync_directory(os.path.dirname(final))

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
            unlink_if_exists(path)
            used -= size

    def open(
        self,
        ref: SnapshotRef,
        *,
        expect_namespace: Namespace | None = None,
        on_prefix: PrefixHook | None = None,
    ) -> SnapshotView:
        """Map and validate the snapshot's file (see SnapshotStore.open); marks it used."""
        path = self.path_of(ref)
        try:
            view = open_snapshot_file(path, expect_namespace=expect_namespace, on_prefix=on_prefix)
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"snapshot {ref.snapshot_id} not found in {self!r} ({path})"
            ) from None
        if view.header.snapshot_id != ref.snapshot_id:
            view.close()
            raise ValueError(
                f"{path} holds snapshot {view.header.snapshot_id}, not {ref.snapshot_id}"
            )
        touch(path)
        return view

    def delete(self, ref: SnapshotRef) -> bool:
        """Unlink the snapshot's file; False if it was not there."""
        return unlink_if_exists(self.path_of(ref))
