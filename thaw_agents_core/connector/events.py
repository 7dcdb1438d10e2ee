"""The connector's event log: one JSON line per load, save or failure."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


class EventLog:
    """Append-only JSON lines, one per load/save outcome (a metric tests and tools can read)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, **event: Any) -> None:
        """Append one event (``time`` and ``pid`` added); a no-op without a path."""
        if not self.path:
            return
        event.setdefault("time", round(time.time(), 6))
        event.setdefault("pid", os.getpid())
        line = json.dumps(event, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as handle:
            handle.write(line)
