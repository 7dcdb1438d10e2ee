"""ThawWorkerExtension: weight methods vLLM mixes into its workers (``worker_extension_cls``).

Called through vLLM's public ``collective_rpc`` (``AsyncLLM`` / ``LLMEngine``), on every rank:

    thaw_load_weights(desc, weights_version)   desc from sources.describe: a .thaw file (this
                                               rank's), a WeightsBuffer, CUDA IPC tensors
        -> validate namespace + tensor table (nothing written yet) -> copy through the stream
           scheduler -> CRC32C verified -> fence.set_weights_version (the KV namespace follows)
    thaw_freeze(path, weights_version, durable) this rank's parameters -> path (per-rank name)
    thaw_register_buffer(desc)                 pin a WeightsBuffer once (CUDA), before a swap
    thaw_weights_version()                     the version this rank serves
    thaw_weights_intact()                      False after a swap that failed part-way

``collective_rpc`` runs between engine steps, so no request runs on half-swapped weights. Each
method returns a small JSON-able dict.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from thaw_agents_core.transport.stream_scheduler import StreamScheduler
from thaw_agents_core.weights import fence, model_params
from thaw_agents_core.weights.apply import restore_model
from thaw_agents_core.weights.io import open_weights, write_weights
from thaw_agents_core.weights.ranks import rank_path, resolve_rank_file
from thaw_agents_core.weights.restore import (
    RestoreStats,
    copy_tensors,
    state_dict_mismatches,
)

logger = logging.getLogger("thaw_agents.weights")

WORKER_EXTENSION = "thaw_agents_core.weights.extension.ThawWorkerExtension"


class ThawWorkerExtension:
    """Mixed into vLLM's Worker class: ``self`` is the worker (model_runner, vllm_config)."""

    def _thaw_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_thaw")
        if state is None:
            model = self.model_runner.get_model()
            device = next(model.parameters()).device
            state = {"copier": StreamScheduler(device), "buffers": {}}
            self.__dict__["_thaw"] = state
        return state

    def _thaw_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _thaw_rank(self) -> tuple[int, int]:
        ns = model_params.engine_namespace(self.vllm_config, "")
        return ns.tp_rank, ns.tp_size

    def _thaw_buffer(self, desc: dict[str, Any]) -> Any:
        from thaw_agents_core.weights.buffer import WeightsBuffer

        state = self._thaw_state()
        buf = state["buffers"].get(desc["name"])
        if buf is None or buf.capacity != desc["size"]:
            buf = WeightsBuffer.attach(desc["name"])
            seconds = state["copier"].register_host(buf.buffer)
            logger.info(
                "thaw: registered weights buffer %s (%d bytes) in %.2f s",
                desc["name"],
                buf.capacity,
                seconds,
            )
            state["buffers"][desc["name"]] = buf
        return buf

    def thaw_register_buffer(self, desc: dict[str, Any]) -> dict[str, Any]:
        """Attach and pin a WeightsBuffer now, so the first swap from it runs at full rate."""
        began = time.perf_counter()
        self._thaw_buffer(desc)
        return {"seconds": round(time.perf_counter() - began, 6)}

    def thaw_load_weights(
        self, desc: dict[str, Any], weights_version: str | None = None
    ) -> dict[str, Any]:
        """Install new weights from ``desc`` (see module docstring); returns RestoreStats JSON
        and spans: ``call_s`` (this call's whole time in the worker), ``fence_s`` (publishing
        the version); for CUDA IPC ``parse_s`` (handles validated), ``check_s`` (the table
        against the model), ``install_s`` (opens and copies)."""
        called = time.perf_counter()
        spans: dict[str, float] = {}
        model, state = self._thaw_model(), self._thaw_state()
        kind = desc.get("kind")
        if kind == "cuda_ipc":
            from thaw_agents_core.transport.cuda_ipc import open_tensor
            from thaw_agents_core.weights.sources import parse_cuda_ipc

            handles = parse_cuda_ipc(desc)
            spans["parse_s"] = time.perf_counter() - called
            # The last swap's tensors stay open until this swap has opened its own: torch then
            # opens the trainer's next export of the same memory from its handle cache (H200:
            # 3.4 ms instead of 13.8 ms for 227 tensors), and the trainer gets that memory back
            # one swap later. They are dropped after this swap, off its path (_drop_later).
            _join_drop(state)
            previous: list[torch.Tensor] = state.pop("ipc_held", [])
            held: list[torch.Tensor] = []
            checked = time.perf_counter()
            fits = not state_dict_mismatches(handles, model_params.targets(model))
            spans["check_s"] = time.perf_counter() - checked
            if fits:  # install's targets are the parameters just checked (written in place)
                stats = model_params.install(
                    model,
                    self.vllm_config,
                    lambda t: copy_tensors(handles, t, keep=held, checked=True),
                )
                spans["install_s"] = time.perf_counter() - checked - spans["check_s"]
            else:
                opened: dict[Any, Any] = {}
                tensors = {n: open_tensor(h, opened) for n, h in handles.items()}
                held += tensors.values()
                began = time.perf_counter()
                model_params.install(
                    model,
                    self.vllm_config,
                    lambda _: model_params.load_checkpoint_tensors(
                        model, self.vllm_config, list(tensors.items())
                    ),
                )
                stats = RestoreStats(
                    len(tensors),
                    sum(t.numel() * t.element_size() for t in tensors.values()),
                    time.perf_counter() - began,
                    layout="checkpoint",
                )
            state["ipc_held"] = held
            _drop_later(state, previous)
            version = weights_version or ""
        else:
            if kind == "file":
                rank, size = self._thaw_rank()
                weights = open_weights(resolve_rank_file(desc["path"], rank, size))
            elif kind == "shm":
                weights = self._thaw_buffer(desc).open()
            else:
                raise ValueError(f"unknown weights source kind {kind!r}: file, shm or cuda_ipc")
            try:
                stats = restore_model(model, self.vllm_config, weights, state["copier"])
            finally:
                weights.close()
            version = weights_version if weights_version is not None else stats.weights_version
        fenced = time.perf_counter()
        fence.set_weights_version(fence.engine_id_of(self.vllm_config), version)
        spans["fence_s"] = time.perf_counter() - fenced
        spans["call_s"] = time.perf_counter() - called
        stats.weights_version = version
        return {**stats.to_json(), **{k: round(v, 6) for k, v in spans.items()}}

    def thaw_freeze(
        self, path: str, weights_version: str = "", durable: bool = False
    ) -> dict[str, Any]:
        """Write this rank's parameters (engine layout) to ``path`` (its per-rank name;
        ``durable``: fsynced before returning)."""
        rank, size = self._thaw_rank()
        model = self._thaw_model()
        tensors = model_params.engine_tensors(model, self.vllm_config)
        ns = model_params.engine_namespace(
            self.vllm_config, weights_version or self.thaw_weights_version()
        )
        stats = write_weights(
            rank_path(path, rank, size),
            list(tensors.items()),
            ns,
            copier=self._thaw_state()["copier"],
            durable=durable,
        )
        return stats.to_json()

    def thaw_weights_intact(self) -> bool:
        """Whether this rank's parameters are a verified set (False after a swap that failed
        once its first byte was written)."""
        return model_params.weights_intact(self._thaw_model())

    def thaw_weights_version(self) -> str:
        """The weights version this rank serves."""
        kv = getattr(self.vllm_config, "kv_transfer_config", None)
        default = str(
            (getattr(kv, "kv_connector_extra_config", None) or {}).get("weights_version", "")
        )
        return fence.weights_version(fence.engine_id_of(self.vllm_config), default)


def _drop_later(state: dict[str, Any], tensors: list[torch.Tensor]) -> None:
    """Drop tensors opened from CUDA IPC handles on a thread, off the swap's path: each drop
    decrements and unmaps torch's reference-counter file (H200 host: 3-7 ms for 195 tensors),
    one tensor at a time, giving the GIL back between drops so the engine runs on."""

    def drop() -> None:
        while tensors:
            tensors.pop()
            time.sleep(0)

    if tensors:
        thread = threading.Thread(target=drop, name="thaw-ipc-release", daemon=True)
        thread.start()
        state["ipc_dropping"] = thread


def _join_drop(state: dict[str, Any], timeout_s: float = 30.0) -> None:
    """Wait for the last swap's drops (long done by the next swap; bounded all the same)."""
    thread = state.pop("ipc_dropping", None)
    if thread is not None:
        thread.join(timeout_s)


def _register_loader() -> None:
    # Workers import this module (worker_extension_cls) before they load the model, so
    # load_format="thaw" is known wherever the extension is configured.
    from thaw_agents_core.weights.loader import register

    register()


_register_loader()
