"""Renderers of scripts/render_results.py, one module per subject (see that script)."""
