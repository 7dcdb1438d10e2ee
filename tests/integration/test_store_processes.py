"""FileStore and ShmStore across processes: shared snapshots, concurrent writers, dead ones.

Each test starts child Python processes (no engine); the single-process store tests are
tests/unit/test_store.py, and both take their sample snapshots from tests/store_samples.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from store_samples import (  # noqa: F401  (no_shm_leaks: an autouse fixture)
    BASE,
    CAPACITY,
    KEY,
    chain,
    no_shm_leaks,
    shm_name,
    snapshot,
)

from thaw_agents_core.snapshot.chunks import verify_chunks
from thaw_agents_core.snapshot.format import parse_snapshot
from thaw_agents_core.store.file import FileStore
from thaw_agents_core.store.shm import ShmStore

TESTS = Path(__file__).resolve().parents[1]  # store_samples.py's folder, for the children


def run_child(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# -- FileStore ----------------------------------------------------------------------------


def test_filestore_reclaims_temp_files_of_dead_writers(tmp_path):
    FileStore(tmp_path)
    dead_pid = int(run_child("import os; print(os.getpid())"))
    (tmp_path / ".tmp" / f"{dead_pid}-1-abcd.partial").write_bytes(b"x")
    FileStore(tmp_path)
    assert os.listdir(tmp_path / ".tmp") == []


# -- ShmStore -----------------------------------------------------------------------------


def child_code(name: str, body: str) -> str:
    """A child process's code: attach to ShmStore ``name``, run ``body``, close."""
    return f"""
import hashlib, sys
sys.path.insert(0, {str(TESTS)!r})
from store_samples import KEY, BASE, snapshot, chain
from thaw_agents_core.store.shm import ShmStore
s = ShmStore({name!r}, create=False)
{textwrap.dedent(body)}
s.close()
"""


def test_shm_two_processes_share_snapshots():
    with ShmStore(shm_name(), CAPACITY, create=True) as s:
        # child publishes, parent finds and reads it
        sid = run_child(
            child_code(s.name, "print(s.publish_bytes(KEY, snapshot(BASE, seed=7)).snapshot_id)")
        )
        match = s.lookup(KEY, chain(BASE))
        assert match is not None and match.ref.snapshot_id == sid and match.num_blocks == 10
        with s.open(match.ref) as view:
            assert bytes(view.payload) == bytes(parse_snapshot(snapshot(BASE, seed=7)).payload)
        # parent publishes, child finds it and reads identical bytes
        ref = s.publish_bytes(KEY, snapshot(BASE[:20] + [3] * 8, seed=8))
        digest = run_child(
            child_code(
                s.name,
                """
            m = s.lookup(KEY, chain(BASE[:20] + [3] * 8))
            v = s.open(m.ref)
            print(m.ref.snapshot_id, m.num_blocks, hashlib.sha256(v.payload).hexdigest())
            v.close()
        """,
            )
        )
        import hashlib

        expected = hashlib.sha256(
            parse_snapshot(snapshot(BASE[:20] + [3] * 8, seed=8)).payload
        ).hexdigest()
        assert digest == f"{ref.snapshot_id} 7 {expected}"
    # the child attached and closed: it did not unlink, the parent (creator) did


def test_shm_concurrent_writers_never_overlap():
    with ShmStore(shm_name(), 16 * 4096, create=True) as s:  # room for 8 of 12 x 3 snapshots
        body = """
            for i in range(12):
                s.publish_bytes(KEY, snapshot(BASE[:4 * (1 + i % 8)], seed=int(sys.argv[1]) * 100 + i))
        """
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(child_code(s.name, body)), str(k)],
                                  stderr=subprocess.PIPE, text=True) for k in range(3)]  # fmt: skip
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read()
            p.stderr.close()
        regions = sorted(s.region_of(i.ref) for i in s.list(KEY))
        assert 1 <= len(regions) <= 8
        for (off, length), (next_off, _) in zip(regions, regions[1:]):
            assert off + length <= next_off
        for info in s.list(KEY):
            with s.open(info.ref) as view:
                assert verify_chunks(view) == []
        assert os.listdir(os.path.join(s.path, "reservations")) == []


def test_shm_reservation_of_dead_process_is_reclaimed():
    with ShmStore(shm_name(), 4 * 4096, create=True) as s:
        run_child(child_code(s.name, "r = s.reserve(4 * 4096); import os; os._exit(0)"))
        assert len(os.listdir(os.path.join(s.path, "reservations"))) == 1
        with s.reserve(4 * 4096) as r:  # the dead child's region is reclaimed
            assert r.offset == 0
        assert os.listdir(os.path.join(s.path, "reservations")) == []
