"""ThawConnector: a vLLM KV connector that restores prompt prefixes from KV snapshots.

A thin facade (like vLLM's offloading_connector): by role it builds the scheduler side
(``scheduler``) or the worker side (``worker``) and delegates; what crosses between them is
``meta.ThawConnectorMetadata``; the settings are ``settings.ConnectorSettings``.

Use it with an engine you build yourself::

    from vllm import LLM
    from thaw_agents_core import kv_transfer_config, open_store

    store = open_store("shm://agents?capacity=4GiB")          # this process owns the arena
    llm = LLM(model=..., kv_transfer_config=kv_transfer_config("shm://agents"))

A request asks for its prompt's full blocks to be snapshotted with
``SamplingParams(extra_args={"kv_transfer_params": {"thaw": {"save": True}}})``; the result
(snapshot id, namespace) comes back in ``RequestOutput.kv_transfer_params["thaw"]``. Any
request whose prompt starts with a published prefix loads it instead of computing it.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from thaw_agents_core.connector.meta import ThawConnectorMetadata
from thaw_agents_core.connector.scheduler import SchedulerSide
from thaw_agents_core.connector.settings import (
    ConnectorSettings,
    check_pipeline_stages,
    kv_transfer_config,
)
from thaw_agents_core.connector.worker import WorkerSide
from thaw_agents_core.store.base import SnapshotStore
from thaw_agents_core.store.url import attach_url, open_store

__all__ = ["ThawConnector", "kv_transfer_config"]


class ThawConnector(KVConnectorBase_V1):
    """KV connector: snapshot prompt prefixes into a store; load them into later requests."""

    def __init__(
        self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_pipeline_stages(
            int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
        )
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = ConnectorSettings.from_extra_config(extra)

        def _open() -> SnapshotStore:
            return open_store(attach_url(self.settings.store))

        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(vllm_config, kv_cache_config, self.settings, _open)
        else:
            self._worker = WorkerSide(vllm_config, kv_cache_config, self.settings, _open)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """vLLM worker hook, once at startup: wrap the per-layer KV tensors in a KVTransport."""
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """vLLM worker hook, before the forward pass: run this step's loads (verified copies,
        then scatter into the KV blocks)."""
        assert self._worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, ThawConnectorMetadata)
        self._worker.start_load_kv(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """vLLM worker hook, before each attention layer: nothing to wait for."""
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """vLLM worker hook, after each attention layer: nothing (saves happen in
        wait_for_save)."""
        return  # saves gather every layer at once in wait_for_save

    def wait_for_save(self) -> None:
        """vLLM worker hook, after the forward pass: run this step's saves (gather, checksum,
        publish a snapshot)."""
        assert self._worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, ThawConnectorMetadata)
        self._worker.wait_for_save(metadata)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM worker hook, after the step: the block ids whose loads failed since the last
        call (vLLM recomputes them)."""
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    def reset_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache(reset_connector=True)``: after a weight swap the
        scheduler side takes the new weights version (worker side: on its next step)."""
        if self._scheduler is not None:
            self._scheduler.refresh_namespace(published=True)
        if self._worker is not None:
            self._worker.refresh_namespace()
        return True

    def shutdown(self) -> None:
        """vLLM hook, engine shutdown: close the transport and store, forget the weights fence
        (worker) and close the payload verifier (scheduler)."""
        if self._worker is not None:
            self._worker.close()
            from thaw_agents_core.weights import fence

            fence.forget(fence.engine_id_of(self._vllm_config))
        if self._scheduler is not None:
            self._scheduler.verifier.close()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """vLLM scheduler hook, for a waiting request: how many prompt tokens beyond
        ``num_computed_tokens`` a snapshot provides (None: ask again next step); never async."""
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """vLLM scheduler hook, after the request's blocks are allocated: plan its load into
        them."""
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        """vLLM scheduler hook, once per step: this step's loads and saves for the workers."""
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        """vLLM scheduler hook, when a request ends: (False: free its blocks now, the
        ``kv_transfer_params`` with its snapshot result and load decision, or None)."""
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)
