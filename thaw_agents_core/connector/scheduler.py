"""ThawConnector, scheduler side: find snapshot blocks for new requests; plan loads and saves.

Runs inside vLLM's scheduler (engine-core process), on its hot path, so a miss must be cheap:
one block-hash chain per request (cached), one store lookup (a stat + dict probe on a miss).

    new request ──> get_num_new_matched_tokens
                      save requested? ──> remember (SaveState); the prompt's full blocks will be
                                          snapshotted in the step that computes the last of them
                      load: chain = hashes of the prompt's full blocks (never the last token)
                            store.lookup(namespace, chain) -> k blocks
                            report k*block_size - num_computed_tokens external tokens
                ──> update_state_after_alloc: the request's block ids -> LoadOp
                ──> build_connector_meta: LoadOps (loaded before this step's forward) and SaveOps
                    (saved after it) -> ThawConnectorMetadata
    finished ──> request_finished: tell the frontend where its snapshot is (kv_transfer_params)
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from thaw_agents_core.connector.cost import cost_model_for
from thaw_agents_core.connector.events import EventLog
from thaw_agents_core.connector.meta import LoadOp, SaveOp, ThawConnectorMetadata
from thaw_agents_core.connector.settings import PARAMS_KEY, ConnectorSettings
from thaw_agents_core.connector.verifier import SnapshotVerifier
from thaw_agents_core.connector.worker import local_prefetcher
from thaw_agents_core.snapshot.block_hashes import block_hash_chain
from thaw_agents_core.snapshot.namespace import namespace_for, tensor_parallel_size
from thaw_agents_core.store.base import SnapshotNotFoundError, SnapshotRef, SnapshotStore
from thaw_agents_core.util import compat
from thaw_agents_core.weights import fence

logger = logging.getLogger("thaw_agents.connector")


@dataclass(slots=True)
class _PendingLoad:
    snapshot_id: str
    first_block: int
    end_block: int
    last_hash: str


@dataclass(slots=True)
class _SaveState:
    snapshot_id: str
    token_ids: list[int]
    num_blocks: int
    extra: dict[str, Any]
    block_ids: list[int] = field(default_factory=list)
    emitted: bool = False
    existing: bool = False


def kv_bytes_per_token(kv_cache_config: Any, block_size: int) -> int:
    """KV bytes one token takes across all layers (0 when vLLM does not say)."""
    try:
        num_blocks = int(kv_cache_config.num_blocks)
        total = sum(int(t.size) for t in kv_cache_config.kv_cache_tensors)
        return total // max(1, num_blocks * block_size)
    except (AttributeError, TypeError, ValueError):
        return 0


class SchedulerSide:
    """Everything the ThawConnector does inside vLLM's scheduler (see the module docstring)."""

    def __init__(
        self, vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings, open_store: Any
    ) -> None:
        self.settings = settings
        self.block_size = int(vllm_config.cache_config.block_size)
        self._vllm_config = vllm_config
        self._engine_id = fence.engine_id_of(vllm_config)
        self.namespace = namespace_for(vllm_config, settings.weights_version)
        self.namespace_key = self.namespace.key()
        self._other_rank_keys = self._rank_keys()
        self._open_store = open_store
        self._store: SnapshotStore | None = None
        self._chains: dict[str, list[bytes]] = {}
        self._pending: dict[str, _PendingLoad] = {}
        self._loads: list[LoadOp] = []
        self._saves: dict[str, _SaveState] = {}
        self._decisions: dict[str, dict[str, Any]] = {}
        self.events = EventLog(settings.events_path)
        self.verifier = self._new_verifier()
        sync = not getattr(vllm_config.scheduler_config, "async_scheduling", False)
        self.cost = cost_model_for(self.namespace_key, synchronous_steps=sync)
        self.bytes_per_token = kv_bytes_per_token(kv_cache_config, self.block_size)

    def _new_verifier(self) -> SnapshotVerifier:
        verify = self.settings.verify_payload
        check_payload = verify if verify is not None else not compat.is_cpu_platform()
        return SnapshotVerifier(
            lambda: self.store,
            self.namespace,
            self._refused,
            check_payload=check_payload,
            prefetcher=lambda: local_prefetcher(self._engine_id),
        )  # why: connector/verifier.py

    def _refused(self, ref: Any, reason: str) -> None:
        self.events.write(event="load_refused", snapshot_id=ref.snapshot_id, error=reason)

    @property
    def store(self) -> SnapshotStore:
        """The snapshot store, attached on first use."""
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def refresh_namespace(self, published: bool = False) -> None:
        """Follow a weight swap (weights/fence.py): the namespace of the current version
        (``published``: read the version file the workers wrote, after a swap)."""
        read = fence.published_weights_version if published else fence.weights_version
        version = read(self._engine_id, self.settings.weights_version)
        if version != self.namespace.weights_version:
            self.namespace = namespace_for(self._vllm_config, version)
            self.namespace_key = self.namespace.key()
            self._other_rank_keys = self._rank_keys()
            self.verifier.close()
            self.verifier = self._new_verifier()

    def _rank_keys(self) -> list[str]:
        """The namespace keys of tensor-parallel ranks 1..n-1 (lookups go by rank 0's)."""
        version = self.namespace.weights_version
        size = tensor_parallel_size(self._vllm_config)
        return [namespace_for(self._vllm_config, version, r).key() for r in range(1, size)]

    def _every_rank_has(self, snapshot_id: str, num_blocks: int) -> bool:
        """Whether every other rank holds its shard of ``snapshot_id`` (at least ``num_blocks``
        blocks): a prefix is offered only when each rank can load its own KV heads."""
        for key in self._other_rank_keys:
            try:
                if self.store.info(SnapshotRef(key, snapshot_id)).num_blocks < num_blocks:
                    return False
            except (SnapshotNotFoundError, OSError):
                return False
        return True

    # ------------------------------------------------------------------ lookups

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """vLLM scheduler hook, for a waiting request: register a requested save, then look up
        the longest published prefix of its full blocks (never the last token) and return
        (tokens it loads beyond ``num_computed_tokens``, False); None while its payload is being
        verified, 0 on a miss, a store error, a refused snapshot or a cost-model skip."""
        self.refresh_namespace()
        params = (getattr(request, "kv_transfer_params", None) or {}).get(PARAMS_KEY) or {}
        prompt = list(request.prompt_token_ids or [])
        if params.get("save") and request.request_id not in self._saves:
            self._register_save(request.request_id, prompt, params)
        if not self.settings.load or params.get("load") is False:
            return 0, False
        # Never report the whole prompt: vLLM must compute at least its last token.
        max_blocks = (len(prompt) - 1) // self.block_size
        if max_blocks * self.block_size <= num_computed_tokens:
            return 0, False
        chain = self._chain(request.request_id, prompt, max_blocks)
        try:
            match = self.store.lookup(self.namespace_key, chain, max_blocks=max_blocks)
        except OSError as exc:  # a store problem must never fail the request: recompute
            logger.warning("thaw: snapshot lookup failed (%s); computing the prompt", exc)
            return 0, False
        if (
            match is None
            or match.num_blocks * self.block_size <= num_computed_tokens
            or not self._every_rank_has(match.ref.snapshot_id, match.num_blocks)
        ):
            self._pending.pop(request.request_id, None)
            return 0, False
        last_hash = chain[match.num_blocks - 1].hex()
        verdict = self.verifier.verdict(match.ref, match.num_blocks, last_hash)
        if verdict is None:
            return None, False  # its payload is being checked: vLLM asks again next step
        if not verdict:
            self._pending.pop(request.request_id, None)
            return 0, False
        num_tokens = match.num_blocks * self.block_size - num_computed_tokens
        decision = self.cost.decide(num_tokens, num_tokens * self.bytes_per_token)
        self._decisions[request.request_id] = decision.to_json()
        if not decision.load:  # this engine recomputes these tokens faster than it loads them
            self.events.write(
                event="load_skipped",
                req_id=request.request_id,
                snapshot_id=match.ref.snapshot_id,
                decision=decision.to_json(),
            )
            self._pending.pop(request.request_id, None)
            return 0, False
        self._pending[request.request_id] = _PendingLoad(
            snapshot_id=match.ref.snapshot_id,
            first_block=num_computed_tokens // self.block_size,
            end_block=match.num_blocks,
            last_hash=last_hash,
        )
        return match.num_blocks * self.block_size - num_computed_tokens, False

    def _chain(self, req_id: str, prompt: list[int], max_blocks: int) -> list[bytes]:
        chain = self._chains.get(req_id)
        if chain is None or len(chain) < max_blocks:
            chain = block_hash_chain(prompt[: max_blocks * self.block_size], self.block_size)
            self._chains[req_id] = chain
        return chain[:max_blocks]

    def _register_save(self, req_id: str, prompt: list[int], params: dict[str, Any]) -> None:
        num_blocks = len(prompt) // self.block_size
        state = _SaveState(
            snapshot_id=params.get("snapshot_id") or secrets.token_hex(16),
            token_ids=prompt[: num_blocks * self.block_size],
            num_blocks=num_blocks,
            extra=dict(params.get("extra") or {}),
        )
        if num_blocks == 0:
            state.emitted = True  # nothing to save: request_finished reports why
        else:
            chain = block_hash_chain(state.token_ids, self.block_size)
            match = self.store.lookup(self.namespace_key, chain)
            # Reuse only a snapshot of exactly these blocks: a longer one that starts with them
            # would make the handle's durable copy (PrefixHandle.save) another, longer prefix.
            if (
                match is not None
                and match.num_blocks == num_blocks
                and self._num_blocks_of(match.ref) == num_blocks
                and self._every_rank_has(match.ref.snapshot_id, num_blocks)
            ):
                state.snapshot_id, state.emitted, state.existing = (
                    match.ref.snapshot_id,
                    True,
                    True,
                )
        self._saves[req_id] = state

    def _num_blocks_of(self, ref: SnapshotRef) -> int | None:
        try:
            return self.store.info(ref).num_blocks
        except (SnapshotNotFoundError, OSError):  # evicted meanwhile: save a new one
            return None

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """vLLM scheduler hook, after allocation: turn the request's pending match into a LoadOp
        on its newly allocated block ids."""
        pending = self._pending.pop(request.request_id, None)
        if pending is None or num_external_tokens == 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        self._loads.append(
            LoadOp(
                req_id=request.request_id,
                namespace_key=self.namespace_key,
                snapshot_id=pending.snapshot_id,
                first_block=pending.first_block,
                end_block=pending.end_block,
                block_ids=block_ids[pending.first_block : pending.end_block],
                expected_last_hash=pending.last_hash,
            )
        )

    # ------------------------------------------------------------------ per-step metadata

    def build_connector_meta(self, scheduler_output: Any) -> ThawConnectorMetadata:
        """vLLM scheduler hook, once per step: the planned LoadOps, plus a SaveOp for each
        save request whose full prompt blocks are computed by the end of this step."""
        self.cost.on_step(int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0))
        meta = ThawConnectorMetadata(loads=self._loads)
        self._loads = []
        if not self._saves:
            return meta
        done_tokens: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            state = self._saves.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                done_tokens[new.req_id] = (
                    new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._saves.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:  # after preemption: the full list
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            done_tokens[req_id] = (
                cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id]
            )
        for req_id, computed in done_tokens.items():
            state = self._saves[req_id]
            needed = state.num_blocks * self.block_size
            if (
                not state.emitted
                and computed >= needed
                and len(state.block_ids) >= state.num_blocks
            ):
                meta.saves.append(
                    SaveOp(
                        req_id=req_id,
                        snapshot_id=state.snapshot_id,
                        token_ids=state.token_ids,
                        block_ids=state.block_ids[: state.num_blocks],
                        extra=state.extra,
                    )
                )
                state.emitted = True
        return meta

    # ------------------------------------------------------------------ completion

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        """vLLM scheduler hook, when a request ends: drop its state; return (False: blocks are
        freed at once, ``{"thaw": {"snapshot": ..., "load_decision": ...}}`` or None)."""
        req_id = request.request_id
        self._chains.pop(req_id, None)
        self._pending.pop(req_id, None)
        state = self._saves.pop(req_id, None)
        params: dict[str, Any] = {}
        decision = self._decisions.pop(req_id, None)
        if decision is not None:
            params["load_decision"] = decision
        if state is not None:
            params["snapshot"] = self._save_result(state)
        return False, ({PARAMS_KEY: params} if params else None)

    def _save_result(self, state: _SaveState) -> dict[str, Any]:
        result: dict[str, Any] = {
            "snapshot_id": state.snapshot_id,
            "namespace_key": self.namespace_key,
            "namespace": self.namespace.to_json(),
            "num_tokens": state.num_blocks * self.block_size,
            "block_size": self.block_size,
            "store": self.settings.store,
            "existing": state.existing,
        }
        if state.num_blocks == 0:
            result.update(
                ok=False,
                error=f"the prefix is shorter than one KV block "
                f"({self.block_size} tokens): nothing to snapshot",
            )
            return result
        try:
            self.store.info(SnapshotRef(self.namespace_key, state.snapshot_id))
            result["ok"] = True
        except (SnapshotNotFoundError, OSError) as exc:
            result.update(
                ok=False,
                error=f"snapshot was not published ({exc}); see the engine "
                "log for the worker's error",
            )
        return result
