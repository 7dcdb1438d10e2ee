"""What ChatThaw adds to a LangChain chat model: prefix snapshots, fork pools and weights.

A mixin of :class:`~thaw_agents.chat_model.ChatThaw` (it uses the model's ``engine``,
``kv_store``, ``model_name``, ``engine_spec()`` and LangChain's ``_convert_input``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any, Sequence

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage, messages_to_dict

from thaw_agents import messages as msg
from thaw_agents_core.fork import branches as forking
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.pool.fork_pool import ForkPool
from thaw_agents_core.snapshot.namespace import Namespace


class SnapshotsAndWeights:
    """Prefix snapshots (``snapshot`` / ``asnapshot`` / ``load_snapshot``), ``fork_pool`` and
    the engine's weights (``load_weights``, ``freeze_weights``, ``kv_namespace``)."""

    # ------------------------------------------------------------------ prefix snapshots
    #
    #   messages --render (no generation prompt)--> prefix token ids
    #     --forking.asnapshot_ids: one request, max_tokens=1, {"thaw": {"save": True}}-->
    #   engine: prefill (reusing its prefix cache) -> connector saves the full blocks
    #     --> PrefixHandle (+ the prefix messages, so branches can be rendered after it)

    def render_prefix(self, messages: Sequence[BaseMessage]) -> msg.RenderedPrompt:
        """The prefix as the chat template renders it at the start of a longer conversation."""
        return msg.render(self.engine.tokenizer, messages, add_generation_prompt=False)

    def _require_store(self) -> None:
        if self.kv_store is None:
            raise ValueError(
                "snapshots need a KV store: create the model with ChatThaw(kv_store='auto') (a "
                "shared-memory store for this process), kv_store='shm://NAME?capacity=2GiB' or "
                "a directory path"
            )

    def _handle(
        self, handle: PrefixHandle, rendered: msg.RenderedPrompt, extra: dict[str, Any]
    ) -> PrefixHandle:
        return dataclasses.replace(
            handle,
            model_name=self.model_name,
            prefix_text=rendered.text,
            extra={**handle.extra, **extra},
        )

    async def asnapshot(
        self, prefix: LanguageModelInput, *, extra: dict[str, Any] | None = None
    ) -> PrefixHandle:
        """Compute a prefix (messages) once and snapshot its KV cache; returns a handle.

        Any engine on this store (this one, pool workers, another process's ChatThaw) then
        starts prompts that begin with the prefix from the snapshot instead of recomputing it.
        Needs ``kv_store``.
        """
        self._require_store()
        if not self.engine.is_started:  # first use: model build and engine start off the loop
            await asyncio.to_thread(self.engine.start)
        messages = self._convert_input(prefix).to_messages()
        rendered = self.render_prefix(messages)
        extra = {**(extra or {}), "messages": messages_to_dict(messages)}
        handle = await forking.asnapshot_ids(self.engine, rendered.token_ids, extra)
        return self._handle(handle, rendered, extra)

    def snapshot(
        self, prefix: LanguageModelInput, *, extra: dict[str, Any] | None = None
    ) -> PrefixHandle:
        """Blocking twin of ``asnapshot``."""
        self._require_store()
        messages = self._convert_input(prefix).to_messages()
        rendered = self.render_prefix(messages)
        extra = {**(extra or {}), "messages": messages_to_dict(messages)}
        handle = forking.snapshot_ids(self.engine, rendered.token_ids, extra)
        return self._handle(handle, rendered, extra)

    def load_snapshot(self, src: str | os.PathLike[str]) -> PrefixHandle:
        """Validate a saved snapshot (file or ``s3://``) and publish it in this model's store.

        Refuses, naming each differing field, a snapshot made by another model, dtype, KV
        layout, block size or weights version.
        """
        self._require_store()
        engine = self.engine
        return PrefixHandle.load(
            src,
            engine.store,
            store_url=engine.store_url or "",
            expect_namespace=engine.namespace(),
            model_name=self.model_name,
        )

    def fork_pool(self, num_workers: int = 2, *, start: bool = True, **kwargs: Any) -> ForkPool:
        """A ForkPool of warm worker processes running this model on its KV store (started
        unless ``start=False``). Use with ``fork_fanout(..., pool=pool)``; close it with
        ``pool.close()`` or ``with``. ``kwargs`` go to ``ForkPool``."""
        if self.kv_store is None:
            raise ValueError(
                "a ForkPool needs the model's kv_store (e.g. ChatThaw(kv_store='auto'))"
            )
        engine = self.engine
        engine.start()  # owns the store; the workers attach to it
        spec = self.engine_spec()
        key = engine.namespace().key()
        boot = spec.connector_settings
        if boot is None or engine.weights_version == boot.weights_version:
            pool = ForkPool(spec, num_workers, expected_namespace_key=key, **kwargs)
            return pool.start() if start else pool
        # The parent was hot-swapped: workers boot, then load the parent's current weights.
        if engine.last_weights_file is None or not start:
            raise ValueError(
                f"this model's weights were swapped to {engine.weights_version!r} "
                "from a buffer or state dict: freeze them to a file "
                "(freeze_weights), load_weights that file, then create the pool"
            )
        pool = ForkPool(spec, num_workers, **kwargs).start()
        try:
            pool.load_weights(engine.last_weights_file, engine.weights_version)
        except BaseException:
            pool.close()
            raise
        pool.expected_namespace_key = key
        return pool

    # ------------------------------------------------------------------ weights

    def load_weights(self, src: Any, weights_version: str | None = None) -> str:
        """Hot-swap this model's engine to new weights, no restart; returns the new
        ``weights_version`` (the KV namespace's from now on: older snapshots are refused).

        ``src``: a ``.thaw`` file, a ``WeightsBuffer`` (registered once, reused) or a state
        dict of tensors. Other ChatThaw objects on the same engine see the new weights too; a
        ForkPool is swapped with its own ``pool.load_weights``.
        """
        return self.engine.load_weights(src, weights_version)["weights_version"]

    def freeze_weights(
        self, path: str | os.PathLike[str], *, durable: bool = False
    ) -> list[dict[str, Any]]:
        """Write the engine's weights (its own layout, one file per tensor-parallel rank);
        ``durable``: fsynced before returning (see ``Engine.freeze_weights``)."""
        return self.engine.freeze_weights(path, durable=durable)

    @property
    def current_weights_version(self) -> str:
        """The weights version the engine serves now (changes with ``load_weights``)."""
        return self.engine.weights_version

    def kv_namespace(self) -> Namespace:
        """The namespace (model fingerprint, dtype, layout, block size, weights version, ...)
        a snapshot must match to be loaded by this model's engine."""
        return self.engine.namespace()
