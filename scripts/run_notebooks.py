"""Execute the notebooks in place, so the committed copies carry the outputs of a real run.

    flock /tmp/thaw-engine.lock .venv/bin/python scripts/run_notebooks.py [NOTEBOOK ...]

Default: every notebook under notebooks/. Each runs top to bottom in a real Jupyter kernel
(this interpreter's ``python3`` kernel), from the notebooks/ folder, and is written back with
its outputs (no timing metadata, so re-runs only change what the run changed). A failing cell
stops the run and leaves the notebook file untouched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(path: Path, timeout_s: int) -> float:
    """Run ``path`` in a fresh kernel and write it back with its outputs; returns seconds."""
    notebook = nbformat.read(path, as_version=4)
    began = time.perf_counter()
    client = NotebookClient(
        notebook,
        timeout=timeout_s,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path.resolve(), args.timeout):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
