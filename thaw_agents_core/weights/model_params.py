"""A live vLLM model's parameters in the engine's own layout, and installing new ones.

Engine layout = ``model.named_parameters()`` as vLLM's loader leaves them before kernel
post-processing: fused ``qkv_proj`` / ``gate_up_proj``, this tensor-parallel rank's shard,
the engine dtype. On CUDA (unquantized) post-processing changes nothing, so the live
parameters *are* that layout and a swap is a copy into them (the fast path).

On the CPU, vLLM's post-processing (``dispatch_cpu_unquantized_gemm``) repacks every linear
weight for oneDNN and drops the parameter (an empty tensor stays). So on the CPU a swap
re-creates those parameters with the layer's own ``create_weights``, fills them, and runs vLLM's
``process_weights_after_loading`` again: the engine ends in the state a fresh load of the same
weights gives (tests compare greedy tokens with one). The filled tensors are kept as the
model's *shadow* (CPU only), which is what a freeze of that engine reads.

    install(model, vllm_config, fill)    fill(targets) writes the engine-layout tensors
    weights_intact(model)                False after an install that failed part-way
    engine_tensors(model, vllm_config)   name -> tensor to freeze (CPU: the shadow)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from thaw_agents_core.weights.format import WeightsMismatchError, WeightsNamespace

_SHADOWS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)
_UNVERIFIED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
"""Models whose last install began writing and did not finish verified: their weights are a
mix of old and new (or unchecked) bytes until the next install succeeds."""


def _is_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def check_supported(vllm_config: Any) -> None:
    """Weight snapshots cover unquantized models (the kernel format of quantized ones differs)."""
    quant = getattr(vllm_config.model_config, "quantization", None)
    if quant:
        raise WeightsMismatchError(
            [f"quantization={quant!r}: .thaw snapshots support unquantized models only"]
        )


def engine_namespace(
    vllm_config: Any, weights_version: str, layout: str = "engine"
) -> WeightsNamespace:
    """The namespace a snapshot of this engine (this rank) carries."""
    from thaw_agents_core.snapshot.namespace import (
        _cached_fingerprint,
        local_tensor_rank,
        tensor_parallel_size,
    )

    model_config = vllm_config.model_config
    archs = getattr(model_config.hf_config, "architectures", None) or [""]
    load_format = str(getattr(vllm_config.load_config, "load_format", "auto"))
    return WeightsNamespace(
        model_fingerprint=_cached_fingerprint(model_config, load_format),
        architecture=str(archs[0]),
        dtype=str(model_config.dtype).replace("torch.", ""),
        layout=layout,
        tp_rank=local_tensor_rank(vllm_config),
        tp_size=tensor_parallel_size(vllm_config),
        weights_version=str(weights_version),
    )


def _dropped_linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Linear layers whose weight vLLM-CPU's post-processing replaced by an empty tensor."""
    from vllm.model_executor.layers.linear import LinearBase

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LinearBase)
        and getattr(m, "weight", None) is not None
        and m.weight.numel() == 0
    ]


def _recreate_weight(layer: torch.nn.Module) -> None:
    """The layer's weight parameter as its constructor made it (shape, attrs, weight_loader)."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    method = layer.quant_method
    loader = (
        layer.weight_loader_v2
        if type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
        else layer.weight_loader
    )
    del layer.weight
    method.create_weights(
        layer=layer,
        input_size_per_partition=getattr(layer, "input_size_per_partition", layer.input_size),
        output_partition_sizes=getattr(layer, "output_partition_sizes", [layer.output_size]),
        input_size=layer.input_size,
        output_size=layer.output_size,
        params_dtype=layer.params_dtype,
        weight_loader=loader,
    )


def _reprocess(model: torch.nn.Module, vllm_config: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    with set_current_vllm_config(vllm_config):
        process_weights_after_loading(model, vllm_config.model_config, torch.device("cpu"))


_WALKS: weakref.WeakKeyDictionary[
    torch.nn.Module, list[tuple[dict[str, Any], str, torch.nn.Parameter, str]]
] = weakref.WeakKeyDictionary()
"""model -> (its module's parameter dict, key, parameter, full name) for every parameter, in
``named_parameters`` order: the module walk done once per model."""


def targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the parameter tensor to write (engine layout; tied weights appear once).

    ``named_parameters()`` walks every module (1-3 ms for an 8B model on the H200 host, twice
    per swap); the walk is kept per model and reused while each parameter is still the one its
    module holds under that key (a parameter replaced there, as CPU post-processing does,
    means a new walk; the module tree itself is fixed once vLLM built the model). ``.data`` is
    read on every call.
    """
    walk = _WALKS.get(model)
    if walk is None or any(params.get(key) is not p for params, key, p, _ in walk):
        walk, seen = [], set()
        for prefix, module in model.named_modules():
            params = module._parameters
            for key, p in params.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    walk.append((params, key, p, f"{prefix}.{key}" if prefix else key))
        _WALKS[model] = walk
    return {name: p.data for _, _, p, name in walk}


def install(
    model: torch.nn.Module,
    vllm_config: Any,
    fill: Callable[[dict[str, torch.Tensor]], Any],
    *,
    processed: bool = True,
) -> Any:
    """Write new weights into a live model through ``fill(targets)``; returns what fill returns.

    ``processed``: the model went through post-processing already (a live engine; False inside
    the model loader, where vLLM post-processes after us). CPU: dropped layers are re-created
    before ``fill`` and post-processing re-run after it.
    """
    check_supported(vllm_config)
    cpu = _is_cpu(model)
    _UNVERIFIED.add(model)  # from the first write on, until verified
    if cpu and processed:
        for _, layer in _dropped_linear_layers(model):
            _recreate_weight(layer)
    with torch.no_grad():
        result = fill(targets(model))
    if cpu:
        _SHADOWS[model] = targets(model)  # before post-processing drops them again
        if processed:
            _reprocess(model, vllm_config)
    _UNVERIFIED.discard(model)
    return result


def weights_intact(model: torch.nn.Module) -> bool:
    """False when an install into ``model`` started writing and failed (bad CRC, I/O error):
    its parameters are then neither the old weights nor the new ones."""
    return model not in _UNVERIFIED


def engine_tensors(model: torch.nn.Module, vllm_config: Any) -> dict[str, torch.Tensor]:
    """The tensors a freeze writes: the live parameters (CUDA) or the shadow (CPU).

    A CPU engine that loaded its weights the normal way has no shadow yet: its layers are
    re-created and re-loaded from the model's own checkpoint with vLLM's own loader (the very
    weights it runs), and that becomes the shadow.
    """
    check_supported(vllm_config)
    if not _is_cpu(model):
        return targets(model)
    shadow = _SHADOWS.get(model)
    if shadow is None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import get_model_loader

        loader = get_model_loader(vllm_config.load_config)

        def reload(_: dict[str, torch.Tensor]) -> None:
            with set_current_vllm_config(vllm_config):
                loader.load_weights(model, vllm_config.model_config)

        install(model, vllm_config, reload)
        shadow = _SHADOWS[model]
    return shadow


def load_checkpoint_tensors(
    model: torch.nn.Module, vllm_config: Any, named: list[tuple[str, torch.Tensor]]
) -> None:
    """Checkpoint-layout tensors (the model folder's names) through ``model.load_weights``:
    vLLM's own weight loaders fuse and shard them."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vllm_config):
        loaded = model.load_weights(iter(named))
    if loaded is not None:
        missing = sorted(set(targets(model)) - set(loaded))
        if missing:
            raise WeightsMismatchError([f"{n}: not set by the snapshot's tensors" for n in missing])
