"""ShmStore: snapshots shared by the processes of one host through ONE shared-memory arena.

One arena (instead of one segment per snapshot) lets a GPU process pin it with a single
``cudaHostRegister`` at start-up and later DMA any snapshot another process writes into it.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import reprlib
import secrets
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.snapshot.format import SnapshotView, parse_snapshot
from thaw_agents_core.snapshot.framing import ALIGNMENT, align_up
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
from thaw_agents_core.util.files import flocked, touch
from thaw_agents_core.util.process_identity import process_alive, process_token

LAYOUT = "thaw-shm/1"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class ShmStoreFullError(RuntimeError):
    """No gap fits even after evicting every published snapshot (pending reservations remain)."""


@dataclass(slots=True)
class ShmDescriptor:
    """``index/<namespace_key>/<snapshot_id>.json``: where a published snapshot lives."""

    snapshot_id: str
    namespace_key: str
    offset: int  # into the arena, ALIGNMENT-aligned
    length: int  # bytes of the .thawkv snapshot; the region is align_up(length)
    num_blocks: int
    created_unix: float
    block_hashes: list[str]  # hex, as in the header
    pid: int  # publisher, for debugging

    @classmethod
    def from_json(cls, obj: Any) -> ShmDescriptor:
        """Parse a descriptor file's object; ValueError unless offsets and counts are sane."""
        if not isinstance(obj, dict) or set(obj) != set(cls.__dataclass_fields__):
            raise ValueError(f"not a descriptor: {reprlib.repr(obj)}")
        d = cls(**obj)
        ints = (d.offset, d.length, d.num_blocks, d.pid)
        if not all(type(v) is int and v >= 0 for v in ints) or d.offset % ALIGNMENT:
            raise ValueError(f"bad descriptor {reprlib.repr(obj)}")
        if not (
            isinstance(d.snapshot_id, str)
            and isinstance(d.namespace_key, str)
            and type(d.created_unix) in (int, float)
            and isinstance(d.block_hashes, list)
            and all(isinstance(h, str) for h in d.block_hashes)
        ):
            raise ValueError(f"descriptor fields of the wrong type: {reprlib.repr(obj)}")
        if len(d.block_hashes) != d.num_blocks:
            raise ValueError(
                f"descriptor lists {len(d.block_hashes)} hashes for {d.num_blocks} blocks"
            )
        return d


@dataclass(slots=True)
class _Region:
    offset: int
    nbytes: int  # aligned
    path: str  # descriptor or reservation file
    is_snapshot: bool
    last_used_ns: int


def _write_json_atomic(path: str, obj: Any) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _unlink_tree(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked child
        shutil.rmtree(path, ignore_errors=True)


class ShmStore(SnapshotStore):
    """Snapshots in one shared-memory arena, indexed by small JSON descriptors::

        /dev/shm/thaw-<name>/
          meta.json                       {"layout": "thaw-shm/1", "capacity_bytes": N}
          arena                           N bytes, fallocate'd, mmapped MAP_SHARED by everyone
          lock                            flock: reserve / evict / commit / abort / delete
          reservations/<rid>.json         regions being written: offset, length, pid, start time
          index/<namespace_key>/<id>.json published snapshots (ShmDescriptor)

        arena  | snap A (.thawkv bytes) |pad| reserved (being written) |  free  | snap B |pad|
               0                        4096-aligned regions, first fit        capacity

    Lifecycle:
      1. Creator (``create=True``, or ``None`` when the store does not exist): builds the whole
         directory under a temporary name, fallocates the arena (so a too-small /dev/shm fails
         here, not with SIGBUS later) and renames it into place: attachers never see half a store.
      2. Attachers (``create=False``, or ``None`` when it exists): open and mmap the arena.
         A GPU process may pin ``arena_view()`` once now; every later snapshot lands inside it.
      3. Writers: ``reserve(n)`` records a reservation (under the lock, first fit; if nothing
         fits, published snapshots are evicted least-recently-used first), fill ``buffer``,
         ``commit()`` writes the descriptor (tmp + rename = atomic publish) then drops the
         reservation. Reservations of dead processes are reclaimed by the next ``reserve``.
      4. Readers: ``lookup`` -> ``open`` validates the region and checks it still holds the
         descriptor's snapshot id; the region may be evicted and reused while being read, which
         the reader's CRC check (``verify_chunks``) detects.
      5. ``close()``: attachers only unmap. The creator's ``close()`` (or its GC / interpreter
         exit) also unlinks the directory; processes still attached keep their mapping until
         they close. Only the creator unlinks (``destroy``). A creator killed before it could
         (SIGKILL) leaves the directory behind; ``meta.json`` names the creator (pid + start
         time), and the next store created on this host removes it (``remove_stale``).
    """

    def __init__(
        self,
        name: str,
        capacity_bytes: int | None = None,
        *,
        create: bool | None = None,
        shm_root: str = "/dev/shm",
    ):
        super().__init__()
        if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
            raise ValueError(
                f"bad ShmStore name {name!r}: 1-64 of [A-Za-z0-9_.-], not starting with . or -"
            )
        self.name = name
        self.path = os.path.join(shm_root, f"thaw-{name}")
        self.is_owner = False
        self._mm = None
        wants_create = create or (create is None and capacity_bytes is not None)
        if wants_create:
            ShmStore.remove_stale(shm_root)  # stores whose creator died (SIGKILL, crash)
        exists = os.path.exists(os.path.join(self.path, "meta.json"))
        if create or (create is None and not exists and capacity_bytes is not None):
            if capacity_bytes is None or capacity_bytes <= 0:
                raise ValueError(
                    f"creating ShmStore {name!r} needs capacity_bytes > 0, got {capacity_bytes}"
                )
            try:
                self._create(shm_root, align_up(capacity_bytes))
            except FileExistsError:
                if create:
                    raise  # create=None: another process won the race; attach to its store
        elif not exists:
            raise FileNotFoundError(
                f"no ShmStore {name!r} at {self.path}: create it first with a capacity "
                f"(ShmStore({name!r}, capacity_bytes) or shm://{name}?capacity=1GiB)"
            )
        try:
            self._attach()
        except BaseException:
            if self.is_owner:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._lock = os.path.join(self.path, "lock")
        self._finalizer = (
            weakref.finalize(self, _unlink_tree, self.path, os.getpid()) if self.is_owner else None
        )

    def _attach(self) -> None:
        with open(os.path.join(self.path, "meta.json")) as f:
            try:
                meta = json.load(f)
            except RecursionError:
                meta = None
        layout = meta.get("layout") if isinstance(meta, dict) else None
        if layout != LAYOUT:
            raise ValueError(
                f"{self.path} has layout {reprlib.repr(layout)}, this version reads {LAYOUT!r}"
            )
        fd = os.open(os.path.join(self.path, "arena"), os.O_RDWR)
        try:
            self.capacity_bytes = os.fstat(fd).st_size
            self._mm: mmap.mmap | None = mmap.mmap(fd, self.capacity_bytes)
        finally:
            os.close(fd)
        self._arena = memoryview(self._mm)

    def _create(self, shm_root: str, capacity: int) -> None:
        tmp = tempfile.mkdtemp(prefix=f".thaw-{self.name}.", suffix=".creating", dir=shm_root)
        try:
            os.makedirs(os.path.join(tmp, "index"))
            os.makedirs(os.path.join(tmp, "reservations"))
            open(os.path.join(tmp, "lock"), "wb").close()
            fd = os.open(os.path.join(tmp, "arena"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, capacity)
            except (OSError, OverflowError) as e:  # OverflowError: capacity past off_t (2**63)
                free = shutil.disk_usage(shm_root).free
                raise OSError(
                    getattr(e, "errno", None) or errno.EFBIG,
                    f"cannot allocate a {capacity}-byte arena in {shm_root} ({free} bytes free): "
                    f"lower capacity_bytes or grow {shm_root} (docker run --shm-size)",
                ) from None
            finally:
                os.close(fd)
            pid, start_ticks = process_token()
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(
                    {
                        "layout": LAYOUT,
                        "capacity_bytes": capacity,
                        "owner_pid": pid,
                        "owner_start_ticks": start_ticks,
                    },
                    f,
                )
            os.chmod(tmp, 0o700)
            try:
                os.rename(tmp, self.path)
            except OSError:
                raise FileExistsError(
                    f"ShmStore {self.name!r} already exists at {self.path}: attach with create=False, "
                    f"or remove a stale one with ShmStore.unlink({self.name!r})"
                ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.is_owner = True

    def __repr__(self) -> str:
        return (
            f"ShmStore({self.name!r}, capacity_bytes={self.capacity_bytes}, owner={self.is_owner})"
        )

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap (left to the GC while views from open() live); the creator also unlinks."""
        super().close()
        if self._mm is None:
            return
        self._arena.release()
        try:
            self._mm.close()
        except BufferError:
            pass
        self._mm = None
        if self.is_owner:
            self.destroy()

    def destroy(self) -> None:
        """Unlink the store's directory (creator only). Mapped processes keep their memory."""
        if not self.is_owner:
            raise RuntimeError(
                f"{self!r} is attached, not the creator: only the creator destroys it"
            )
        if self._finalizer is not None:
            self._finalizer()

    @staticmethod
    def remove_stale(shm_root: str = "/dev/shm") -> list[str]:
        """Remove every store under ``shm_root`` whose creator is no longer running (its
        ``meta.json`` names the creator by pid and start time); returns the removed paths.

        Called whenever a store is created, so a SIGKILLed owner's arena does not stay in
        /dev/shm for good. Stores of live creators, and any without an owner record, are kept.
        """
        removed = []
        try:
            names = os.listdir(shm_root)
        except OSError:
            return removed
        for entry in names:
            if not entry.startswith("thaw-"):
                continue
            path = os.path.join(shm_root, entry)
            try:
                with open(os.path.join(path, "meta.json")) as f:
                    meta = json.load(f)
                pid, ticks = int(meta["owner_pid"]), int(meta["owner_start_ticks"])
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                continue
            if pid != os.getpid() and not process_alive(pid, ticks):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    @staticmethod
    def unlink(name: str, shm_root: str = "/dev/shm") -> None:
        """Remove a store left behind by a crashed creator."""
        if _NAME_RE.fullmatch(name) is None:
            raise ValueError(f"bad ShmStore name {name!r}")
        shutil.rmtree(os.path.join(shm_root, f"thaw-{name}"), ignore_errors=True)

    # -- index hooks ------------------------------------------------------------------------
    def _namespace_dir(self, namespace_key: str) -> str:
        return os.path.join(self.path, "index", namespace_key)

    def _entry_id(self, filename: str) -> str | None:
        if filename.endswith(".json") and not filename.startswith("."):
            return filename[:-5]
        return None

    def _descriptor_path(self, ref: SnapshotRef) -> str:
        check_key(ref.namespace_key)
        check_key(ref.snapshot_id, "snapshot_id")
        return os.path.join(self.path, "index", ref.namespace_key, ref.snapshot_id + ".json")

    def _read_descriptor(self, ref: SnapshotRef) -> ShmDescriptor:
        path = self._descriptor_path(ref)
        try:
            with open(path) as f:
                d = ShmDescriptor.from_json(json.load(f))
        except FileNotFoundError:
            raise SnapshotNotFoundError(f"snapshot {ref.snapshot_id} is not in {self!r}") from None
        except RecursionError:  # nested past the recursion limit: as corrupt as bad JSON
            raise ValueError(f"descriptor {path} is not a descriptor (nested too deeply)") from None
        if (d.snapshot_id, d.namespace_key) != (ref.snapshot_id, ref.namespace_key):
            raise ValueError(
                f"descriptor {path} names snapshot {d.snapshot_id} of {d.namespace_key}"
            )
        return d

    def _load_entry(self, namespace_key: str, snapshot_id: str) -> SnapshotInfo:
        ref = SnapshotRef(namespace_key, snapshot_id)
        try:
            d = self._read_descriptor(ref)
        except SnapshotNotFoundError:
            raise FileNotFoundError(snapshot_id) from None
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(str(e)) from None
        hashes = tuple(bytes.fromhex(h) for h in d.block_hashes)
        return SnapshotInfo(ref, d.num_blocks, d.length, d.created_unix, hashes)

    # -- arena ----------------------------------------------------------------------------
    def arena_view(self) -> memoryview:
        """The whole arena (writable), e.g. to pin it once with cudaHostRegister."""
        return self._arena[:]

    def region_of(self, ref: SnapshotRef) -> tuple[int, int]:
        """(offset, length) of a published snapshot inside the arena."""
        d = self._read_descriptor(ref)
        return d.offset, d.length

    def _regions(self) -> list[_Region]:
        """Every allocated region; reclaims reservations of dead processes. Lock held."""
        out = []
        rdir = os.path.join(self.path, "reservations")
        for name in os.listdir(rdir):
            if name.startswith("."):
                continue
            path = os.path.join(rdir, name)
            try:
                with open(path) as f:
                    r = json.load(f)
                region = _Region(int(r["offset"]), int(r["nbytes"]), path, False, 0)
                alive = process_alive(int(r["pid"]), int(r["start"]))
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError, RecursionError):
                alive = False  # unreadable: treat as abandoned
            if not alive:
                os.unlink(path)
                continue
            out.append(region)
        idir = os.path.join(self.path, "index")
        for ns in os.listdir(idir):
            for name in os.listdir(os.path.join(idir, ns)):
                if self._entry_id(name) is None:
                    continue
                path = os.path.join(idir, ns, name)
                try:
                    with open(path) as f:
                        d = ShmDescriptor.from_json(json.load(f))
                    mtime = os.stat(path).st_mtime_ns
                except FileNotFoundError:
                    continue
                except (
                    ValueError,
                    TypeError,
                    RecursionError,
                ):  # unreadable: region unknown, drop it
                    os.unlink(path)
                    continue
                out.append(_Region(d.offset, align_up(d.length), path, True, mtime))
        return out

    def reserve(self, nbytes: int) -> Reservation:
        """A first-fit arena region, evicting least recently used snapshots to make room."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        need = align_up(nbytes)
        if need > self.capacity_bytes:
            raise ValueError(
                f"snapshot needs {nbytes} bytes but the shared-memory arena {self.name!r} holds "
                f"{self.capacity_bytes} bytes: recreate the store with a larger capacity_bytes "
                f"(e.g. shm://{self.name}?capacity={align_up(nbytes, 1 << 20) >> 20}MiB)"
            )
        with flocked(self._lock):
            regions = self._regions()
            while (offset := _first_fit(regions, need, self.capacity_bytes)) is None:
                published = [r for r in regions if r.is_snapshot]
                if not published:
                    pending = sum(r.nbytes for r in regions)
                    raise ShmStoreFullError(
                        f"no {need}-byte gap in arena {self.name!r} ({self.capacity_bytes} bytes): "
                        f"{pending} bytes are held by {len(regions)} pending reservation(s) of live processes"
                    )
                victim = min(published, key=lambda r: (r.last_used_ns, r.path))
                try:
                    os.unlink(victim.path)
                except FileNotFoundError:
                    pass
                regions.remove(victim)
            rid = secrets.token_hex(8)
            pid, start = process_token()
            path = os.path.join(self.path, "reservations", f"{rid}.json")
            _write_json_atomic(path, {"offset": offset, "nbytes": need, "pid": pid, "start": start})
        return _ShmReservation(self, path, offset, nbytes)

    def open(
        self,
        ref: SnapshotRef,
        *,
        expect_namespace: Namespace | None = None,
        on_prefix: PrefixHook | None = None,
    ) -> SnapshotView:
        """Validate the snapshot in its arena region, zero-copy (see SnapshotStore.open)."""
        d = self._read_descriptor(ref)
        if d.offset + d.length > self.capacity_bytes:
            raise ValueError(f"descriptor of {ref.snapshot_id} points past the arena end: {d}")
        region = self._arena[d.offset : d.offset + d.length]
        where = f"region [{d.offset}, {d.offset + d.length}) of arena {self.name!r}"
        try:
            view = parse_snapshot(region, expect_namespace=expect_namespace, on_prefix=on_prefix)
        except SnapshotError as e:
            if not os.path.exists(self._descriptor_path(ref)):
                raise SnapshotNotFoundError(
                    f"{ref.snapshot_id} was evicted while opening ({where})"
                ) from None
            raise SnapshotError(f"{where}: {e}") from None
        if view.header.snapshot_id != ref.snapshot_id or view.total_bytes != d.length:
            found = view.header.snapshot_id
            view.payload.release()
            raise SnapshotNotFoundError(
                f"{where} now holds snapshot {found}, not {ref.snapshot_id}: it was evicted and reused"
            )
        touch(self._descriptor_path(ref))
        return view

    def delete(self, ref: SnapshotRef) -> bool:
        """Remove the snapshot's descriptor (its region becomes free); False if gone."""
        with flocked(self._lock):
            try:
                os.unlink(self._descriptor_path(ref))
                return True
            except FileNotFoundError:
                return False


def _first_fit(regions: list[_Region], need: int, capacity: int) -> int | None:
    cursor = 0
    for r in sorted(regions, key=lambda r: r.offset):
        if r.offset - cursor >= need:
            return cursor
        cursor = max(cursor, r.offset + r.nbytes)
    return cursor if capacity - cursor >= need else None


class _ShmReservation(Reservation):
    def __init__(self, store: ShmStore, path: str, offset: int, nbytes: int):
        self.store, self.path, self.offset, self.nbytes = store, path, offset, nbytes
        self.buffer = store._arena[offset : offset + nbytes]

    def commit(self, namespace_key: str | None = None) -> SnapshotRef:
        ref, info = self._validated(namespace_key)
        s = self.store
        desc = ShmDescriptor(
            snapshot_id=ref.snapshot_id, namespace_key=ref.namespace_key, offset=self.offset,
            length=info.total_bytes, num_blocks=info.num_blocks, created_unix=info.created_unix,
            block_hashes=[h.hex() for h in info.block_hashes], pid=os.getpid(),
        )  # fmt: skip
        with flocked(s._lock):
            if not os.path.exists(self.path):
                raise RuntimeError(
                    f"reservation {self.path} vanished (store destroyed?): not published"
                )
            final = s._descriptor_path(ref)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.exists(final):
                raise FileExistsError(f"snapshot {ref.snapshot_id} is already published in {s!r}")
            _write_json_atomic(final, asdict(desc))
            touch(final)
            os.unlink(self.path)
        self.done = True
        self.buffer.release()
        return ref

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.buffer.release()
        with flocked(self.store._lock):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
