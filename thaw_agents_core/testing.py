"""Test and benchmark helpers (not used at run time): real model shapes without weights, and
corrupting a published snapshot on purpose."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from thaw_agents_core.engine.models import cache_dir

LLAMA_3_1_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
}


def llama_8b_shaped_path() -> Path:
    """A folder with only Llama-3.1-8B's config.json: real shapes for ``load_format="dummy"``.

    vLLM's dummy weights are seeded per parameter, so two processes get identical weights:
    right for KV save/load and determinism checks, meaningless as text. Use with
    ``skip_tokenizer_init=True`` and token-id prompts (no tokenizer is shipped).
    """
    target = cache_dir() / "models" / "llama-3.1-8b-shaped"
    config = target / "config.json"
    if not config.exists():
        target.mkdir(parents=True, exist_ok=True)
        tmp = config.with_suffix(".tmp")
        tmp.write_text(json.dumps(LLAMA_3_1_8B_CONFIG, indent=2))
        os.replace(tmp, config)
    return target


def flip_payload_bit(store: Any, ref: Any, at: int | Callable[[Any], int], bit: int = 0x40) -> None:
    """Flip ``bit`` of payload byte ``at`` (or ``at(header)``) of a published snapshot, in place:
    in a FileStore's file or a ShmStore's arena. Its header and CRCs stay as published."""
    with store.open(ref) as view:
        offset = view.payload_offset + (at(view.header) if callable(at) else at)
    if hasattr(store, "region_of"):
        start, _ = store.region_of(ref)
        store.arena_view()[start + offset] ^= bit
        return
    path = Path(store.path_of(ref))
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))
