"""The notebook runs top to bottom in a real Jupyter kernel, on a real engine."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "fork_agents.ipynb"


def test_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "\n".join(out.get("text", "") for cell in notebook.cells
                        if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert "Paris" in outputs
    assert "reused" in outputs
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
