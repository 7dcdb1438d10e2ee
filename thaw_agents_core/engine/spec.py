"""What identifies an engine: model, dtype, context, engine arguments and connector settings.

Two equal specs share one engine (``registry``); a spec is plain data (JSON-able strings), so a
pool sends it to its workers as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw_agents_core.connector.settings import ConnectorSettings
from thaw_agents_core.util import compat


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What identifies an engine: two specs that compare equal share one engine."""

    model: str
    """Local folder or hub id of the model (already resolved; see models.resolve_model)."""
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    engine_kwargs_json: str = "{}"
    """Extra ``AsyncEngineArgs`` as canonical JSON (a dict is not hashable)."""
    kv_transfer_json: str | None = None
    """``KVTransferConfig`` fields as canonical JSON, or None for no connector."""

    @staticmethod
    def create(
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
        kv_transfer: dict[str, Any] | None = None,
    ) -> EngineSpec:
        """A spec from Python values (the dicts become canonical JSON)."""
        return EngineSpec(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            engine_kwargs_json=json.dumps(engine_kwargs or {}, sort_keys=True),
            kv_transfer_json=json.dumps(kv_transfer, sort_keys=True) if kv_transfer else None,
        )

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        """The extra ``AsyncEngineArgs`` as a dict."""
        return json.loads(self.engine_kwargs_json)

    @property
    def connector_settings(self) -> ConnectorSettings | None:
        """The ThawConnector settings of this engine (None: no ThawConnector)."""
        return ConnectorSettings.from_kv_transfer_json(self.kv_transfer_json)

    def model_dtype(self) -> str | None:
        """The dtype a local model folder's config.json declares (None for hub ids)."""
        config = Path(self.model) / "config.json"
        if not config.is_file():
            return None
        data = json.loads(config.read_text())
        return data.get("dtype") or data.get("torch_dtype")

    def engine_args(self) -> Any:
        """The vLLM ``AsyncEngineArgs`` for this spec: our platform, shared-prefix and connector
        defaults under the extra kwargs, thaw's worker extension, the ``KVTransferConfig``."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        engine_kwargs = compat.shared_prefix_engine_defaults(self.engine_kwargs)
        if self.kv_transfer_json:
            engine_kwargs = compat.connector_engine_defaults(engine_kwargs)
        kwargs = compat.platform_engine_defaults(engine_kwargs)
        kwargs.setdefault("disable_log_stats", True)
        # thaw_load_weights / thaw_freeze in every worker (hot swap) and load_format="thaw"
        from thaw_agents_core.weights.extension import WORKER_EXTENSION

        kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        if self.kv_transfer_json:
            from vllm.config import KVTransferConfig

            kwargs["kv_transfer_config"] = KVTransferConfig(**json.loads(self.kv_transfer_json))
        return AsyncEngineArgs(
            model=self.model,
            tokenizer=self.model,
            dtype=compat.resolve_dtype(self.dtype, self.model_dtype()),
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            **kwargs,
        )
