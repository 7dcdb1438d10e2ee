"""What ChatThaw does before any engine runs: constructing starts nothing, and the snapshot
API refuses a model without a KV store before it would start one.

Everything else ChatThaw claims needs an engine: tests/integration/test_chat_model.py.
"""

from __future__ import annotations

from typing import Any

import psutil
import pytest
import torch

from thaw_agents import ChatThaw

# The engine settings of tests/integration/test_chat_model.py (SMOL + GREEDY, TINY).
SMOL: dict[str, Any] = {"max_model_len": 4096}
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 200, "frequency_penalty": 0.5}
TINY: dict[str, Any] = {"model": "tiny"}

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the ChatThaw checks use the "
    "float32 tiny model, CPU-only; on the GPU the 8B-shaped A->B tests "
    "cover the path",
)


def _engine_processes(before: set[int]) -> list[psutil.Process]:
    """Child processes of this test process started since ``before`` (the engine's)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in before:
            continue
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue  # multiprocessing's helper, shared by every spawn in this process
        except psutil.Error:
            continue
        found.append(child)
    return found


def _child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_constructing_starts_nothing():
    before = _child_pids()
    llm = ChatThaw(**SMOL, **GREEDY)
    also = ChatThaw(**TINY)
    assert llm._engine is None and also._engine is None
    assert _engine_processes(before) == []


@cpu_only
def test_snapshot_needs_a_store():
    with pytest.raises(ValueError, match="kv_store"):
        ChatThaw(model="tiny").snapshot("hello")
