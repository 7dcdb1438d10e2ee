"""scripts/render_results.py renders the committed receipts (no engine): every table, and the
charts as PNG files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location(
    "render_results", ROOT / "scripts" / "render_results.py"
)
render_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_results)


def test_sections_name_where_each_number_ran():
    results = ROOT / "benchmarks" / "results"
    text = render_results.what_you_get(results) + render_results.measured(results)
    receipts = sorted(p.name for p in results.glob("*.json"))
    rendered = [name for name in receipts if f"`benchmarks/results/{name}`" in text]
    assert rendered, "no receipt rendered"
    assert "## What you get" in text and "## Measured" in text
    for line in text.splitlines():  # every receipt cited with the machine it ran on
        if "`benchmarks/results/" in line:
            assert "CPU" in line or "GPU" in line, line


def test_charts_are_png(tmp_path):
    pytest.importorskip("matplotlib")  # a dev dependency
    written = render_results.charts(ROOT / "benchmarks" / "results", tmp_path)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
