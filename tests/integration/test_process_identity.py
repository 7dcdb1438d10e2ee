"""Process identity: (pid, start time) names one process; zombies count as exited; reap()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from subprocess import PIPE

from thaw_agents_core.util.process_identity import (
    pid_space,
    process_alive,
    process_start_ticks,
    process_token,
    reap,
)


def _token(process: subprocess.Popen) -> tuple[int, int]:
    ticks = process_start_ticks(process.pid)
    assert ticks is not None
    return process.pid, ticks


def test_token_names_this_process_and_not_a_recycled_pid():
    pid, ticks = process_token()
    assert pid == os.getpid() and process_alive(pid, ticks)
    assert not process_alive(pid, ticks + 1)  # same pid, another start: another process


def test_pid_space_is_stable_within_a_host():
    here = pid_space()
    assert here and here == pid_space()
    child = subprocess.run(
        [sys.executable, "-c", "from thaw_agents_core.util.process_identity import pid_space;"
         "print(pid_space())"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert child.stdout.strip() == here


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    token = _token(child)
    deadline = time.monotonic() + 30
    while process_alive(*token):  # exits, stays a zombie until waited for
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.02)
    assert os.path.exists(f"/proc/{child.pid}")  # not reaped yet: a zombie
    child.wait(timeout=10)


def test_reap_waits_for_a_process_that_exits_by_itself():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=PIPE)
    result: list[list[int]] = []
    try:
        reaper = threading.Thread(target=lambda: result.append(reap([_token(child)], 120.0)))
        reaper.start()
        time.sleep(0.2)
        assert reaper.is_alive()  # still waiting: the child runs until its stdin ends
        child.stdin.close()
        reaper.join(timeout=60)
        assert result == [[]] and child.wait(timeout=10) == 0  # it exited, nobody killed it
    finally:
        child.kill()
        child.wait(timeout=10)


def test_reap_kills_a_process_that_does_not_exit():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        began = time.monotonic()
        assert reap([_token(child)], timeout_s=1.0) == []
        assert time.monotonic() - began >= 1.0
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=10)


def test_reap_does_not_wait_for_processes_already_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    token = _token(child)
    child.wait(timeout=60)
    assert reap([], timeout_s=3600) == []  # nothing to wait for: returns, never sleeps an hour
    assert reap([token], timeout_s=3600) == []
