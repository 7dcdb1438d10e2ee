"""Shared engines: one ``Engine`` per ``EngineSpec`` in this process, reference-counted;
the last release (or interpreter exit) shuts it down."""

from __future__ import annotations

import atexit
import threading

from thaw_agents_core.engine.engine import Engine
from thaw_agents_core.engine.spec import EngineSpec

_registry_lock = threading.Lock()
_engines: dict[EngineSpec, tuple[Engine, int]] = {}


def acquire_engine(spec: EngineSpec) -> Engine:
    """The shared engine for ``spec`` (created, not started); pair with ``release_engine``."""
    with _registry_lock:
        engine, count = _engines.get(spec, (None, 0))
        if engine is None or engine._closed:
            engine, count = Engine(spec), 0
        _engines[spec] = (engine, count + 1)
        return engine


def release_engine(engine: Engine) -> None:
    """Drop one reference; the last one shuts the engine down."""
    with _registry_lock:
        entry = _engines.get(engine.spec)
        if entry is None or entry[0] is not engine:
            return
        count = entry[1] - 1
        if count > 0:
            _engines[engine.spec] = (engine, count)
            return
        del _engines[engine.spec]
    engine.close()


def close_all_engines() -> None:
    """Shut down every shared engine (at exit, and at the end of a test session)."""
    with _registry_lock:
        engines = [engine for engine, _ in _engines.values()]
        _engines.clear()
    for engine in engines:
        engine.close()


atexit.register(close_all_engines)
