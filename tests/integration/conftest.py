"""Integration tier: real vLLM engines, started once per session and shared across tests.

The helper scripts next to this file run as fresh processes by path (``kv_procs.py``,
``fanout_procs.py``) or are imported by the tests (``fanout_procs``, ``kv_procs``, ``moto_s3``):
pytest puts this folder on ``sys.path`` when it imports a test module from it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _close_engines_at_end():
    """Shut every shared engine down while pytest's logging is still open."""
    yield
    from thaw_agents_core.engine.registry import close_all_engines

    close_all_engines()
