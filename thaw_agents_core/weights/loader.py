"""``load_format="thaw"``: a vLLM model loader that starts an engine from a ``.thaw`` snapshot.

    LLM(model=FOLDER, load_format="thaw", model_loader_extra_config={"snapshot": "x.thaw"})

Registered through vLLM's public ``register_model_loader`` (compat.register_model_loader) when
this module is imported: in the engine's workers that happens through
``worker_extension_cls`` (EngineSpec sets it) or the ``vllm.general_plugins`` entry point
(``thaw_agents_core.weights.loader:register``). The model is built with vLLM's usual
initialisation (empty parameters, like ``load_format="dummy"``), then each rank restores its
file (engine layout: copied and CRC-checked through the stream scheduler; checkpoint layout:
through the model's own ``load_weights``); vLLM post-processes as after any load.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from thaw_agents_core.util import compat

LOAD_FORMAT = "thaw"

logger = logging.getLogger("thaw_agents.weights")


def _loader_class() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class ThawModelLoader(BaseModelLoader):
        """Loads a model's weights from a ``.thaw`` file (this rank's)."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            extra = dict(load_config.model_loader_extra_config or {})
            snapshot = extra.pop("snapshot", None)
            if not snapshot or not isinstance(snapshot, str):
                raise ValueError(
                    "load_format='thaw' needs model_loader_extra_config="
                    f"{{'snapshot': 'path/to/weights.thaw'}}; got {snapshot!r}"
                )
            if extra:
                raise ValueError(
                    f"unknown thaw loader settings {sorted(extra)}; valid: ['snapshot']"
                )
            self.snapshot = snapshot

        def download_model(self, model_config: Any) -> None:
            pass  # the snapshot is local

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            from vllm.config import get_current_vllm_config

            from thaw_agents_core.transport.stream_scheduler import StreamScheduler
            from thaw_agents_core.weights import fence, model_params
            from thaw_agents_core.weights.apply import restore_model
            from thaw_agents_core.weights.io import open_weights
            from thaw_agents_core.weights.ranks import resolve_rank_file

            began = time.perf_counter()
            vllm_config = get_current_vllm_config()
            ns = model_params.engine_namespace(vllm_config, "")
            device = next(model.parameters()).device
            copier = StreamScheduler(device)
            try:
                with open_weights(
                    resolve_rank_file(self.snapshot, ns.tp_rank, ns.tp_size)
                ) as weights:
                    warm_s = copier.warm_up()
                    stats = restore_model(model, vllm_config, weights, copier, processed=False)
            finally:
                copier.close()
            if stats.weights_version:
                fence.set_weights_version(fence.engine_id_of(vllm_config), stats.weights_version)
            logger.info(
                "thaw: loaded %d bytes from %s: restore %.3f s of %.3f s in the loader "
                "(first-use setup %.3f s)",
                stats.num_bytes,
                self.snapshot,
                stats.seconds,
                time.perf_counter() - began,
                warm_s,
            )

    return ThawModelLoader


def register() -> None:
    """Register ``load_format="thaw"`` with vLLM (idempotent; the plugin entry point)."""
    compat.register_model_loader(LOAD_FORMAT, _loader_class)


register_loader = register
