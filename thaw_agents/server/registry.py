"""Named models and snapshots of one server.

    ModelEntry     a name -> one ChatThaw (one engine; the engine batches concurrent requests),
                   its weights version and the gate a weights swap closes
    SnapshotEntry  a name/id -> a PrefixHandle made by one model; usable as a ``model``: the
                   request then runs on that model with the snapshot's messages in front

A request's ``model`` is looked up in both (names are unique across them); an unknown name is
a 404 listing what is served. Models registered under different names but with equal engine
settings share one engine (ChatThaw's engine registry).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from thaw_agents.chat_model import ChatThaw
from thaw_agents.fanout import prefix_messages_of
from thaw_agents.server.limits import WeightsGate
from thaw_agents.server.schemas import ApiError, ModelCard, now_s
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.util import compat

logger = logging.getLogger("thaw_agents.server")
EMBEDDED = "embedded"
SNAPSHOT_SUFFIXES = (".thawkv",)


def is_snapshot_source(source: str) -> bool:
    """``--register NAME=PATH``: a ``.thawkv`` file (or s3:// object) is a snapshot."""
    return source.endswith(SNAPSHOT_SUFFIXES)


def _engine_key(source: str) -> str:
    """Names with equal sources share an engine (all models of a registry have the same
    engine settings), hence a weights gate."""
    if source in (EMBEDDED, "", "tiny"):
        return source or EMBEDDED
    return os.path.realpath(source) if os.path.exists(source) else source


def version_label(version: str) -> str:
    """How a weights version is shown: "0" for the weights a model started with unversioned."""
    return version or "0"


@dataclass
class ModelEntry:
    """One served model. ``gate`` is its engine's: names sharing an engine share the gate."""

    name: str
    source: str
    llm: ChatThaw
    gate: WeightsGate
    created: int = field(default_factory=now_s)
    started: bool = False

    @property
    def weights_version(self) -> str:
        """The version the engine serves now (live: a swap through another name that shares
        the engine shows here too)."""
        version = getattr(self.llm.engine, "weights_version", None) if self.started else None
        return version_label(version if isinstance(version, str) else self.llm.weights_version)

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.name,
            created=self.created,
            root=self.source,
            weights_version=self.weights_version,
        )


@dataclass
class SnapshotEntry:
    """One snapshot (made here or loaded from a file / s3://)."""

    id: str
    model: str
    handle: PrefixHandle
    name: str | None = None
    created: int = field(default_factory=now_s)

    def messages(self) -> list[Any]:
        return prefix_messages_of(self.handle)

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "snapshot",
            "name": self.name,
            "model": self.model,
            "created": self.created,
            "num_tokens": self.handle.num_tokens,
            "num_snapshot_tokens": self.handle.num_snapshot_tokens,
            "weights_version": version_label(self.handle.namespace.get("weights_version", "")),
        }
        if full:
            data["handle"] = self.handle.to_json()
        return data

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.name or self.id,
            created=self.created,
            root=self.id,
            kind="snapshot",
            parent=self.model,
        )


class Registry:
    """The server's models and snapshots (mutated on the event loop only)."""

    def __init__(
        self,
        *,
        kv_store: str | None = None,
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        model_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.kv_store = kv_store
        self.max_model_len = max_model_len
        self.engine_kwargs = dict(engine_kwargs or {})
        self.model_defaults = dict(model_defaults or {})
        self.models: dict[str, ModelEntry] = {}
        self.snapshots: dict[str, SnapshotEntry] = {}
        self.default_model: str | None = None
        self._gates: dict[Any, WeightsGate] = {}
        self._store: Any = None

    # ------------------------------------------------------------------ models

    def new_model(self, name: str, source: str) -> ModelEntry:
        """Register a model (its engine is not started yet: ``start``)."""
        self._check_free(name)
        model = None if source in (EMBEDDED, "") else source
        llm = ChatThaw(
            model=model,
            kv_store=self.kv_store,
            max_model_len=self.max_model_len,
            engine_kwargs=self.engine_kwargs,
            **self.model_defaults,
        )
        gate = self._gates.setdefault(_engine_key(source), WeightsGate())
        entry = ModelEntry(name=name, source=source or EMBEDDED, llm=llm, gate=gate)
        self.models[name] = entry
        self.default_model = self.default_model or name
        return entry

    def open_store(self) -> None:
        """Create a shared-memory KV store here, before any engine: this registry owns it
        (engines only attach), so removing one model never unlinks the others' store."""
        if self._store is not None or not self.models:
            return
        url = next(iter(self.models.values())).llm.resolved_kv_store()
        if url is not None and url.startswith("shm://"):
            from thaw_agents_core.store.url import open_store

            self._store = open_store(url)

    async def start(self, entry: ModelEntry) -> None:
        """Start the model's engine off the event loop (a first start takes seconds)."""
        self.open_store()
        await asyncio.to_thread(entry.llm.engine.start)
        entry.started = True

    async def add_model(self, name: str, source: str) -> ModelEntry:
        """Register and start a model at runtime; removed again if its engine fails."""
        entry = self.new_model(name, source)
        try:
            await self.start(entry)
        except Exception:
            self.models.pop(name, None)
            await asyncio.to_thread(entry.llm.close)
            raise
        return entry

    async def remove_model(self, name: str) -> None:
        entry = self.model(name)
        await entry.gate.acquire_write()  # let requests using it finish
        try:
            del self.models[name]
            for sid in [s for s, e in self.snapshots.items() if e.model == name]:
                del self.snapshots[sid]
            if self.default_model == name:
                self.default_model = next(iter(self.models), None)
            await asyncio.to_thread(entry.llm.close)
        finally:
            entry.gate.release_write()

    def engine_requests(self, entry: ModelEntry) -> int | None:
        """Requests unfinished in the model's engine now (None: not started)."""
        engine = entry.llm.engine if entry.started else None
        if engine is None or not engine.is_started:
            return None
        return compat.num_unfinished_requests(engine.llm)

    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise self._unknown(name)
        return entry

    def resolve(self, name: str) -> tuple[ModelEntry, SnapshotEntry | None]:
        """A request's ``model``: a model, or a snapshot (with the model that made it)."""
        if name in self.models:
            return self.models[name], None
        snapshot = self._find_snapshot(name)
        if snapshot is None:
            raise self._unknown(name)
        return self.model(snapshot.model), snapshot

    def cards(self) -> list[ModelCard]:
        return [e.card() for e in self.models.values()] + [
            s.card() for s in self.snapshots.values()
        ]

    # ------------------------------------------------------------------ snapshots

    def add_snapshot(self, model: str, handle: PrefixHandle, name: str | None) -> SnapshotEntry:
        if name is not None:
            existing = self._find_snapshot(name)
            if not (existing is not None and existing.id == handle.snapshot_id):
                self._check_free(name)
        entry = SnapshotEntry(id=handle.snapshot_id, model=model, handle=handle, name=name)
        self.snapshots[entry.id] = entry
        return entry

    def snapshot(self, key: str) -> SnapshotEntry:
        entry = self._find_snapshot(key)
        if entry is None:
            raise ApiError(
                404,
                f"no snapshot {key!r}; known: {sorted(self.snapshots) or 'none'}",
                param="snapshot",
                code="snapshot_not_found",
            )
        return entry

    def remove_snapshot(self, key: str) -> SnapshotEntry:
        entry = self.snapshot(key)
        del self.snapshots[entry.id]
        return entry

    def _find_snapshot(self, key: str) -> SnapshotEntry | None:
        if key in self.snapshots:
            return self.snapshots[key]
        return next((e for e in self.snapshots.values() if e.name == key), None)

    # ------------------------------------------------------------------ helpers

    def _check_free(self, name: str) -> None:
        if name in self.models or self._find_snapshot(name) is not None:
            raise ApiError(
                409,
                f"the name {name!r} is already served; pick another or remove it first",
                param="name",
                code="name_taken",
            )

    def _unknown(self, name: str) -> ApiError:
        known = sorted(self.models) + sorted(s.name or s.id for s in self.snapshots.values())
        return ApiError(
            404,
            f"the model {name!r} does not exist; served: {known}",
            param="model",
            code="model_not_found",
        )

    async def close(self) -> None:
        """Close every model's engine (the last user of an engine shuts it down)."""
        entries, self.models = list(self.models.values()), {}
        self.snapshots.clear()
        for entry in entries:
            try:
                await asyncio.to_thread(entry.llm.close)
            except Exception:  # noqa: BLE001 - shutting down: close the others anyway
                logger.exception("closing model %s failed", entry.name)
        store, self._store = self._store, None
        if store is not None:
            store.close()  # the owner unlinks the shared-memory store
