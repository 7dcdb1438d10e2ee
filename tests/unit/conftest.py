"""Unit tier: no vLLM engine, no worker process; the whole tier runs in well under two minutes.

Starting an engine or a ForkPool from a test here fails at once, naming the test's right place
(tests/integration/). Child processes of the tests themselves (a second interpreter, a moto
server) belong there too; that part is by convention, since the libraries under test may run
helper tools of their own.
"""

from __future__ import annotations

import importlib

import pytest

# What a unit test must never start: "module:Class.method" -> what it would have started.
NOT_IN_THE_UNIT_TIER = {
    "thaw_agents_core.engine.engine:Engine.start": "a vLLM engine",
    "thaw_agents_core.pool.fork_pool:ForkPool.start": "ForkPool worker processes",
}


@pytest.fixture(autouse=True)
def _no_engine_in_unit_tests(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    for target, what in NOT_IN_THE_UNIT_TIER.items():
        module_name, _, attribute = target.partition(":")
        class_name, method = attribute.split(".")
        cls = getattr(importlib.import_module(module_name), class_name)

        def refuse(*args, _what=what, _target=target, **kwargs):
            raise AssertionError(
                f"{request.node.nodeid} started {_what} ({_target}): move it to tests/integration/"
            )

        monkeypatch.setattr(cls, method, refuse)
    yield
