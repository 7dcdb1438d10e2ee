"""The engine a pool worker runs: one in-process vLLM ``LLMEngine`` serving branch requests.

Both kinds of worker drive one of these and differ only in how frames travel:

    ForkPool worker process (worker.py)       frames over a Unix socket pair (wire.py)
    RayForkPool EngineActor (ray_actor.py)     frames through Ray calls and async generators

    start()               -> ready frame: pid, namespace (JSON) and its key, block_size, startup_s
    add(id, message)      a "generate" message; a bad one -> "error" frame (the engine serves on);
                          its "device_share" (pool/device_shares.py), if any, is opened and
                          held for the load first
    step()                one engine step -> "delta" frames (streamed requests), "done" frames
    abort(id)             drop a request
    load_weights(source)  hot swap between two steps: ThawWorkerExtension through
                          collective_rpc, prefix cache reset, namespace of the new version

Frames go to ``emit(frame)``, called on the thread that calls ``add`` / ``step``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from thaw_agents_core.engine.results import GenerationResult

logger = logging.getLogger("thaw_agents.pool")


@dataclass(slots=True)
class _Running:
    began: float
    stream: bool
    result: GenerationResult


class BranchEngine:
    """One vLLM ``LLMEngine`` (built from the pool's config) and the requests running on it."""

    def __init__(self, config: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
        self.config = config
        self.emit = emit
        self.requests: dict[str, _Running] = {}
        self.engine: Any = None
        self.shares_adopted = 0
        """Device shares held for loads (pool/device_shares.py)."""

    def start(self) -> dict[str, Any]:
        """Build the engine from the config's spec and overrides; the ready frame."""
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
        return {
            "type": "ready",
            "pid": os.getpid(),
            "namespace": namespace.to_json(),
            "namespace_key": namespace.key(),
            "block_size": namespace.block_size,
            "startup_s": round(time.perf_counter() - began, 3),
        }

    @property
    def busy(self) -> bool:
        """Whether the engine has requests to step."""
        return self.engine.has_unfinished_requests()

    def add(self, request_id: str, message: dict[str, Any]) -> None:
        """Add a "generate" message's request; any failure (bad options, vLLM refusing the
        request) is emitted as an "error" frame."""
        from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params
        from thaw_agents_core.util import compat

        if message.get("device_share") is not None:
            self._adopt(message["device_share"])
        try:
            options = GenerationOptions.from_mapping(message.get("options") or {})
            params = to_sampling_params(options, stream=bool(message.get("stream")))
            self.engine.add_request(request_id, compat.tokens_prompt(message["prompt_ids"]), params)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the engine serves on
            self.emit(
                {"type": "error", "id": request_id, "message": f"{type(exc).__name__}: {exc}"}
            )
            return
        self.requests[request_id] = _Running(
            time.perf_counter(),
            bool(message.get("stream")),
            GenerationResult(prompt_tokens=len(message["prompt_ids"])),
        )

    def _adopt(self, desc: Any) -> None:
        """Hold the prefix's verified copy from the parent's GPU for the connector's load; on
        any failure the connector reads the store instead (and checks the bytes itself)."""
        from thaw_agents_core.connector.worker import local_prefetcher
        from thaw_agents_core.transport.device_share import adopt_share
        from thaw_agents_core.weights.fence import engine_id_of

        prefetcher = local_prefetcher(engine_id_of(self.engine.vllm_config))
        if prefetcher is None:
            return
        try:
            if adopt_share(prefetcher, desc):
                self.shares_adopted += 1
        except Exception as exc:  # noqa: BLE001 - the host path stays correct
            logger.warning("thaw: device share not used: %s: %s", type(exc).__name__, exc)

    def abort(self, request_id: str) -> None:
        """Drop a request (nothing if it finished or never started)."""
        if self.requests.pop(request_id, None) is not None:
            self.engine.abort_request([request_id])

    def step(self) -> None:
        """One engine step: a "delta" frame per streamed request with new text, a "done"
        frame per finished request."""
        for out in self.engine.step():
            running = self.requests.get(out.request_id)
            if running is None:
                continue
            text = running.result.absorb(out, running.began, time.perf_counter())
            if running.stream and text:
                self.emit(
                    {
                        "type": "delta",
                        "id": out.request_id,
                        "text": text,
                        "num_tokens": len(out.outputs[0].token_ids),
                    }
                )
            if out.finished:
                del self.requests[out.request_id]
                self.emit(
                    {"type": "done", "id": out.request_id, "result": running.result.to_wire()}
                )

    def load_weights(self, source: dict[str, Any], version: str) -> dict[str, Any]:
        """Hot swap to ``source`` (a weights descriptor) as ``version``, then reset the prefix
        cache; the new version, namespace key and rank 0's load stats. Raises on any failure
        (the pool then replaces this worker)."""
        from thaw_agents_core.snapshot.namespace import namespace_for
        from thaw_agents_core.util import compat
        from thaw_agents_core.weights import fence

        stats = self.engine.collective_rpc("thaw_load_weights", args=(source, version))
        reset = self.engine.reset_prefix_cache
        reset(**compat.reset_prefix_cache_kwargs(reset))
        fence.clear_published(self.engine.vllm_config)  # the scheduler has the version now
        namespace = namespace_for(self.engine.vllm_config, version)
        return {
            "weights_version": version,
            "namespace": namespace.to_json(),
            "namespace_key": namespace.key(),
            "stats": stats[0],
        }
