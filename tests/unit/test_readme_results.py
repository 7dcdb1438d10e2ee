"""The README's numbers are rendered from the committed receipts, never typed by hand: its two
generated sections equal what ``scripts/render_results.py`` makes of benchmarks/results/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _render_module():
    spec = importlib.util.spec_from_file_location(
        "render_results", ROOT / "scripts" / "render_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_readme_generated_sections_match_the_receipts():
    render = _render_module()
    readme = (ROOT / "README.md").read_text()
    assert render.update_readme(readme) == readme, (
        "README.md's generated sections are stale: run "
        "`.venv/bin/python scripts/render_results.py --readme README.md --charts docs`"
    )
