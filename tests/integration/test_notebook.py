"""The notebooks run top to bottom in a real Jupyter kernel, on real engines."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"


def execute(name: str, path: Path) -> list[dict]:
    """Run notebooks/<name> in a fresh kernel (cwd ``path``); returns its code cells' outputs."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path)}}
    )
    client.execute()
    outputs = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    ]
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, errors
    return outputs


def text_of(outputs: list[dict]) -> str:
    return "\n".join(out.get("text", "") for out in outputs)


def test_fork_agents_notebook(tmp_path):
    outputs = execute("fork_agents.ipynb", tmp_path)
    assert "Paris" in text_of(outputs)
    assert "reused" in text_of(outputs)


def test_parallel_reviewers_notebook(monkeypatch):
    """Small sizes (the kernel inherits the environment); the charts render inline as PNGs."""
    monkeypatch.setenv("THAW_NB_ROUNDS", "2")
    monkeypatch.setenv("THAW_NB_MAX_TOKENS", "8")
    outputs = execute("parallel_reviewers.ipynb", NOTEBOOKS)
    text = text_of(outputs)
    assert "prefill computed" in text and "steady state" in text
    assert "reused" in text and "graph TD" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1
