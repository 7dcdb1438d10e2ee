"""Name a process by (pid, start time), so that a recycled pid is never mistaken for it.

Used wherever one process records another and acts on it later: store reservations (reclaimed
when their writer died), the engine-core reaper (kills only the process it was given) and
RayForkPool.close (waits for the actor processes it started on this host to exit).
"""

from __future__ import annotations

import os
import signal
import time


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None  # field 22: starttime
    except (ValueError, IndexError):
        return None


def pid_space() -> str:
    """Names this machine's boot and this process's pid namespace: two processes reporting the
    same value see the same pids ("" where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def process_token() -> tuple[int, int]:
    """(pid, start time): names this process even after its pid is recycled."""
    return os.getpid(), process_start_ticks(os.getpid()) or 0


def process_alive(pid: int, start_ticks: int) -> bool:
    """Whether the process that :func:`process_token` named is still running."""
    fields = _stat_fields(pid)
    if fields is not None:
        if fields[0] in (b"Z", b"X"):  # exited; its parent has not reaped it
            return False
        return len(fields) > 19 and fields[19] == str(start_ticks).encode()
    try:  # gone, or no /proc: fall back to the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc")


def _wait_exited(processes: list[tuple[int, int]], timeout_s: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    left = [p for p in processes if process_alive(*p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if process_alive(*p)]
    return left


def reap(processes: list[tuple[int, int]], timeout_s: float) -> list[int]:
    """Wait up to ``timeout_s`` for each ``(pid, start_ticks)`` to exit, SIGKILL those still
    running and wait up to 5 s more; returns the pids still alive (none, normally)."""
    left = _wait_exited(processes, timeout_s)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return [pid for pid, _ in _wait_exited(left, 5.0)]
