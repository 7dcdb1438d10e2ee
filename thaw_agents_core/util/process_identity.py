"""Name a process by (pid, start time), so that a recycled pid is never mistaken for it.

Used wherever one process records another and acts on it later: store reservations (reclaimed
when their writer died) and the engine-core reaper (kills only the process it was given).
"""

from __future__ import annotations

import os


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


def process_token() -> tuple[int, int]:
    """(pid, start time): names this process even after its pid is recycled."""
    return os.getpid(), process_start_ticks(os.getpid()) or 0


def process_alive(pid: int, start_ticks: int) -> bool:
    """Whether the process that :func:`process_token` named is still running."""
    ticks = process_start_ticks(pid)
    if ticks is None:  # no /proc: fall back to the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc")
    return ticks == start_ticks
