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
import time
from dataclasses import dataclass
from typing import Any

from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.pool import wire

_IDLE_WAIT_S = 0.2


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(slots=True)
class _Running:
    began: float
    stream: bool
    result: GenerationResult


class Worker:
    """The worker process: one vLLM ``LLMEngine`` driven by frames from the parent."""

    def __init__(self, sock: socket.socket, config: dict[str, Any]) -> None:
        self.sock = sock
        self.config = config
        self.frames = wire.FrameBuffer()
        self.requests: dict[str, dict[str, Any]] = {}
        self.engine: Any = None

    def send(self, **message: Any) -> None:
        """Send one frame (the keyword arguments) to the parent."""
        wire.send_blocking(self.sock, message)

    def start_engine(self) -> None:
        """Build the ``LLMEngine`` from the config's spec and overrides; send "ready"."""
        from vllm.v1.engine.llm_engine import LLMEngine

        from thaw_agents_core.engine.spec import EngineSpec
        from thaw_agents_core.snapshot.namespace import namespace_for

        began = time.perf_counter()
        spec = EngineSpec(**self.config["spec"])
        args = spec.engine_args()
        for name, value in self.config.get("engine_overrides", {}).items():
            setattr(args, name, value)
        self.engine = LLMEngine.from_engine_args(args)
        settings = spec.connector_settings
        namespace = namespace_for(
            self.engine.vllm_config, settings.weights_version if settings else ""
        )
        self.send(
            type="ready",
            pid=os.getpid(),
            namespace_key=namespace.key(),
            startup_s=round(time.perf_counter() - began, 3),
        )

    # ------------------------------------------------------------------ requests

    def handle(self, message: dict[str, Any]) -> bool:
        """Act on one message; False means shut down."""
        kind = message["type"]
        if kind == "generate":
            self.add(message)
        elif kind == "abort":
            if message["id"] in self.requests:
                self.engine.abort_request([message["id"]])
                self.requests.pop(message["id"], None)
        elif kind == "load_weights":
            self.load_weights(message)
        elif kind == "ping":
            self.send(type="pong", id=message.get("id"), num_running=len(self.requests))
        elif kind == "shutdown":
            return False
        return True

    def load_weights(self, message: dict[str, Any]) -> None:
        """Hot swap (ThawWorkerExtension through collective_rpc), then reset the prefix cache;
        reply with the new namespace key. Requests queued meanwhile wait for it (same loop)."""
        from thaw_agents_core.snapshot.namespace import namespace_for
        from thaw_agents_core.util import compat
        from thaw_agents_core.weights import fence

        try:
            version = message["weights_version"]
            stats = self.engine.collective_rpc(
                "thaw_load_weights", args=(message["source"], version)
            )[0]
            reset = self.engine.reset_prefix_cache
            reset(**compat.reset_prefix_cache_kwargs(reset))
            fence.clear_published(self.engine.vllm_config)
            namespace = namespace_for(self.engine.vllm_config, version)
        except Exception as exc:  # noqa: BLE001 - reported; the parent kills this worker
            self.send(type="error", id=message["id"], message=f"{type(exc).__name__}: {exc}")
            return
        self.send(
            type="weights_loaded",
            id=message["id"],
            weights_version=version,
            namespace_key=namespace.key(),
            stats=stats,
        )

    def add(self, message: dict[str, Any]) -> None:
        """Add a "generate" request to the engine; any failure (bad options, vLLM refusing the
        request) is sent back as an "error" frame."""
        from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params
        from thaw_agents_core.util import compat

        request_id = message["id"]
        try:
            options = GenerationOptions.from_mapping(message.get("options") or {})
            params = to_sampling_params(options, stream=bool(message.get("stream")))
            self.engine.add_request(request_id, compat.tokens_prompt(message["prompt_ids"]), params)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, worker keeps serving
            self.send(type="error", id=request_id, message=f"{type(exc).__name__}: {exc}")
            return
        self.requests[request_id] = _Running(
            began=time.perf_counter(),
            stream=bool(message.get("stream")),
            result=GenerationResult(prompt_tokens=len(message["prompt_ids"])),
        )

    def step(self) -> None:
        """One engine step: stream deltas, send each finished request's result."""
        for out in self.engine.step():
            running = self.requests.get(out.request_id)
            if running is None:
                continue
            text = running.result.absorb(out, running.began, time.perf_counter())
            if running.stream and text:
                self.send(
                    type="delta",
                    id=out.request_id,
                    text=text,
                    num_tokens=len(out.outputs[0].token_ids),
                )
            if out.finished:
                del self.requests[out.request_id]
                self.send(type="done", id=out.request_id, result=running.result.to_wire())

    def run(self) -> None:
        """Start the engine, then serve frames and step it until "shutdown" or the parent's
        socket closes."""
        self.start_engine()
        running = True
        while running:
            busy = self.engine.has_unfinished_requests()
            readable, _, _ = select.select([self.sock], [], [], 0 if busy else _IDLE_WAIT_S)
            if readable:
                data = self.sock.recv(1 << 20)
                if not data:
                    break  # the parent closed the socket or died
                for message in self.frames.feed(data):
                    running = self.handle(message) and running
            if running and self.engine.has_unfinished_requests():
                self.step()


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
            worker.send(type="fatal", message=f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        raise
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
