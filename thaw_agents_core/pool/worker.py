"""A ForkPool worker: one process, one in-process vLLM engine with ThawConnector.

    python -m thaw_agents_core.pool.worker FD CONFIG_JSON

FD is this end of a Unix socket pair (wire.py frames); CONFIG_JSON is the engine spec and
placement. The worker dies with its parent (PR_SET_PDEATHSIG, and end-of-file on the socket),
so a killed parent never leaves it behind. The engine runs in-process (no engine-core child):
the worker is the only process to account for.

Loop: read the frames that arrived, add their requests, run one engine step, send finished
results (and token deltas for streamed requests); block on the socket only when idle.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from thaw_agents_core.pool import wire
from thaw_agents_core.pool.branch_engine import BranchEngine

_IDLE_WAIT_S = 0.2


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    """The worker process: a :class:`BranchEngine` driven by frames from the parent."""

    def __init__(self, sock: socket.socket, config: dict[str, Any]) -> None:
        self.sock = sock
        self.frames = wire.FrameBuffer()
        self.engine = BranchEngine(config, self.send_frame)

    def send_frame(self, frame: dict[str, Any]) -> None:
        """Send one frame to the parent."""
        wire.send_blocking(self.sock, frame)

    def handle(self, message: dict[str, Any]) -> bool:
        """Act on one message; False means shut down."""
        kind = message["type"]
        if kind == "generate":
            self.engine.add(message["id"], message)
        elif kind == "abort":
            self.engine.abort(message["id"])
        elif kind == "load_weights":
            self.load_weights(message)
        elif kind == "ping":
            running = len(self.engine.requests)
            self.send_frame({"type": "pong", "id": message.get("id"), "num_running": running})
        elif kind == "shutdown":
            return False
        return True

    def load_weights(self, message: dict[str, Any]) -> None:
        """Hot swap (BranchEngine.load_weights) and reply with the new namespace key. Requests
        that arrive meanwhile wait for it (same loop)."""
        try:
            reply = self.engine.load_weights(message["source"], message["weights_version"])
        except Exception as exc:  # noqa: BLE001 - reported; the parent kills this worker
            self.send_frame(
                {"type": "error", "id": message["id"], "message": f"{type(exc).__name__}: {exc}"}
            )
            return
        self.send_frame({"type": "weights_loaded", "id": message["id"], **reply})

    def run(self) -> None:
        """Start the engine, then serve frames and step it until "shutdown" or the parent's
        socket closes."""
        self.send_frame(self.engine.start())
        running = True
        while running:
            readable, _, _ = select.select(
                [self.sock], [], [], 0 if self.engine.busy else _IDLE_WAIT_S
            )
            if readable:
                data = self.sock.recv(1 << 20)
                if not data:
                    break  # the parent closed the socket or died
                for message in self.frames.feed(data):
                    running = self.handle(message) and running
            if running and self.engine.busy:
                self.engine.step()


def main(argv: list[str]) -> int:
    """Worker entry point (``argv``: socket fd, config JSON): die with the parent, pin the CPU
    cores, serve; returns 1 when the parent is already gone, re-raises a fatal error after
    reporting it."""
    die_with_parent()
    fd, config = int(argv[1]), json.loads(argv[2])
    if config.get("parent_pid") and os.getppid() != config["parent_pid"]:
        return 1  # the parent died before the death signal was armed
    cores = config.get("cpu_cores")
    if cores:
        os.sched_setaffinity(0, set(cores))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from thaw_agents_core.util.compat import configure_vllm_environment

    configure_vllm_environment()
    sock = socket.socket(fileno=fd)
    worker = Worker(sock, config)
    try:
        worker.run()
    except Exception as exc:  # noqa: BLE001 - tell the parent why, then exit non-zero
        try:
            worker.send_frame({"type": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        raise
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
