"""The ThawConnector's settings (``kv_connector_extra_config``), parsed once into a typed
object, and the ``KVTransferConfig`` fields that plug the connector into an engine.

No vLLM import: engines, pools and tools build and read these settings without loading vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PARAMS_KEY = "thaw"
"""Key of our entry in a request's ``kv_transfer_params`` (``SamplingParams.extra_args``), both
ways: ``{"thaw": {"save": True}}`` asks for a snapshot, ``{"thaw": {"snapshot": {...}}}`` comes
back in ``RequestOutput.kv_transfer_params``."""

CONNECTOR_MODULE = "thaw_agents_core.connector.facade"
"""Where vLLM imports ``ThawConnector`` from (``thaw_agents_core.connector`` works too)."""


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """``kv_connector_extra_config`` of the ThawConnector, validated."""

    store: str
    """Store URL: ``shm://NAME?capacity=4GiB``, ``file:///path`` or a plain directory path."""
    weights_version: str = ""
    """Bump when weights change in place (RL): part of the namespace."""
    events_path: str | None = None
    """Append one JSON line per load/save/failure here (tests and dashboards read it)."""
    load: bool = True
    """Look up and load published snapshots for new requests."""
    pin_host: bool = True
    """GPU: register the shared-memory arena with CUDA once, for full-speed DMA."""
    verify_payload: bool | None = None
    """Check every chunk's CRC32C on the scheduler side before offering a snapshot (once per
    snapshot). None = on CUDA only, where vLLM's recompute after a failed load is not exact
    (see connector/verifier.py); the worker checks the bytes it copies either way."""
    device_prefetch_bytes: int | None = None
    """Device memory for verified copies of snapshots (transport/prefetch.py), which the
    payload check makes where the worker shares the scheduler's process; the load is then a
    device-to-device scatter. None = 4 GiB on CUDA, off on the CPU; 0 = off."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        """Parse ``kv_connector_extra_config``; ValueError without a ``store`` URL or on an
        unknown key."""
        extra = dict(extra or {})
        store = extra.pop("store", None)
        if not store or not isinstance(store, str):
            raise ValueError(
                "ThawConnector needs kv_connector_extra_config['store'] (e.g. 'shm://thaw' or a "
                f"directory path); got {store!r}"
            )
        known = {
            "weights_version",
            "events_path",
            "load",
            "pin_host",
            "verify_payload",
            "device_prefetch_bytes",
        }
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown ThawConnector settings {unknown}; valid: {sorted(known)}")
        return cls(store=store, **extra)

    @classmethod
    def from_kv_transfer_json(cls, kv_transfer_json: str | None) -> ConnectorSettings | None:
        """The settings inside a ``KVTransferConfig`` as JSON (``EngineSpec.kv_transfer_json``);
        None when there is no connector or it is not ThawConnector."""
        if not kv_transfer_json:
            return None
        config = json.loads(kv_transfer_json)
        if config.get("kv_connector") != "ThawConnector":
            return None
        return cls.from_extra_config(config.get("kv_connector_extra_config"))

    def to_extra_config(self) -> dict[str, Any]:
        """The ``kv_connector_extra_config`` dict these settings parse from."""
        extra: dict[str, Any] = {
            "store": self.store,
            "weights_version": self.weights_version,
            "load": self.load,
        }
        if self.events_path:
            extra["events_path"] = self.events_path
        if not self.pin_host:
            extra["pin_host"] = False
        if self.verify_payload is not None:
            extra["verify_payload"] = self.verify_payload
        if self.device_prefetch_bytes is not None:
            extra["device_prefetch_bytes"] = self.device_prefetch_bytes
        return extra


def check_pipeline_stages(stages: int) -> None:
    """KV snapshots are not per pipeline stage (each stage holds other layers' KV, and the
    namespace names no stage): refuse a connector on more than one. Tensor-parallel ranks are
    fine (each has its own namespace, ``tensor_rank``)."""
    if stages > 1:
        raise ValueError(
            f"the KV connector supports one pipeline stage per engine, got "
            f"pipeline_parallel_size={stages}: KV snapshots are not per stage. Start the engine "
            "without kv_store."
        )


def kv_transfer_config(
    store: str, *, weights_version: str = "", events_path: str | None = None, load: bool = True
) -> dict[str, Any]:
    """Fields of vLLM's ``KVTransferConfig`` that plug ThawConnector into an engine.

    Pass as ``LLM(..., kv_transfer_config=KVTransferConfig(**kv_transfer_config(url)))`` (or the
    dict itself where vLLM accepts one). A failed or refused load is recomputed, never used.
    """
    settings = ConnectorSettings(
        store=store, weights_version=weights_version, events_path=events_path, load=load
    )
    return {
        "kv_connector": "ThawConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": settings.to_extra_config(),
    }
