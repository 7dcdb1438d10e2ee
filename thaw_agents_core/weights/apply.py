"""Installing a validated ``.thaw`` image into a live (or loading) vLLM model.

restore_model(model, vllm_config, weights, copier)
    namespace checked (architecture, dtype, rank) -> nothing written yet
    engine layout, or a table that fits the parameters: restore.restore_into (stream
        scheduler, CRC32C of every chunk where it lands)
    checkpoint layout: CRC32C on the host, then the model's own load_weights (vLLM fuses
        and shards)
    both through model_params.install (CPU: re-create dropped layers, re-run post-processing)
"""

from __future__ import annotations

import time
from typing import Any

import torch

from thaw_agents_core.transport.stream_scheduler import StreamScheduler
from thaw_agents_core.weights import model_params
from thaw_agents_core.weights.format import WeightsMismatchError
from thaw_agents_core.weights.io import WeightsFile
from thaw_agents_core.weights.restore import RestoreStats, restore_into, table_mismatches


def restore_model(
    model: torch.nn.Module,
    vllm_config: Any,
    weights: WeightsFile,
    copier: StreamScheduler,
    *,
    processed: bool = True,
) -> RestoreStats:
    """Install a validated ``.thaw`` image into ``model`` (engine or checkpoint layout)."""
    header = weights.header
    engine_ns = model_params.engine_namespace(vllm_config, header.namespace.weights_version)
    diff = header.namespace.mismatches(engine_ns)
    if diff:
        raise WeightsMismatchError(diff)
    fits = not table_mismatches(header.tensors, model_params.targets(model)) or (
        model_params._is_cpu(model) and processed and _fits_after_recreate(model, header)
    )
    if header.namespace.layout == "engine" or fits:
        return model_params.install(
            model, vllm_config, lambda t: restore_into(weights, t, copier), processed=processed
        )
    weights.verify()  # checkpoint layout: the weight loaders read these host bytes
    named = [(e.name, weights.tensor_of(e)) for e in header.tensors]
    began = time.perf_counter()
    model_params.install(
        model,
        vllm_config,
        lambda _: model_params.load_checkpoint_tensors(model, vllm_config, named),
        processed=processed,
    )
    return RestoreStats(
        len(named),
        header.num_tensor_bytes,
        time.perf_counter() - began,
        weights.path,
        header.namespace.weights_version,
        "checkpoint",
    )


def _fits_after_recreate(model: torch.nn.Module, header: Any) -> bool:
    """CPU: would the table fit once dropped linear weights are re-created (their shapes)?"""
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    for _, layer in model_params._dropped_linear_layers(model):
        shapes_out = sum(getattr(layer, "output_partition_sizes", [layer.output_size]))
        in_size = getattr(layer, "input_size_per_partition", layer.input_size)
        for n, p in model.named_parameters():
            if p is layer.weight:
                shapes[n] = ((shapes_out, in_size), layer.params_dtype)
    by_name = header.by_name()
    if set(by_name) != set(shapes):
        return False
    return all(
        tuple(e.shape) == shapes[n][0] and e.dtype == str(shapes[n][1]).replace("torch.", "")
        for n, e in by_name.items()
    )
