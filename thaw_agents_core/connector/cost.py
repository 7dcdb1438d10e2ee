"""Load or recompute? A small cost model fed by what this engine measures of itself.

    prefill rate   tokens per second of the engine's prefill-heavy steps (the scheduler side
                   times consecutive steps: step i's scheduled tokens / its duration)
    load rate      bytes per second of this engine's own snapshot loads (worker side), plus
                   a fixed cost per load (header, extra scheduler work)

A snapshot of ``num_tokens`` tokens (``num_bytes`` of KV) is loaded only when
``num_bytes / load_rate + load_overhead_s < num_tokens / prefill_rate``. Until both rates have
been measured the model loads. The prefill rate is smoothed (EWMA) and measured only where a
step's wall time is its forward pass (synchronous scheduling: the CPU engine, or CUDA with async
scheduling off); the load rate is the best seen after the first load. Both estimates are
reported with every decision, so a branch's result says why it loaded or not.

One model per engine process: the scheduler side and the worker side of one engine live in the
same process (vLLM's uniprocess executor), so both feed the same object.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

_ALPHA = 0.3
_MIN_PREFILL_TOKENS = 256  # steps with fewer new tokens are decode steps: no prefill rate


@dataclass(slots=True)
class LoadDecision:
    """One decision: load the snapshot or recompute its tokens, and the estimates behind it."""

    load: bool
    num_tokens: int
    num_bytes: int
    load_s: float | None
    recompute_s: float | None

    def to_json(self) -> dict:
        """Plain data for events and results."""
        return asdict(self)


class CostModel:
    """EWMA rates of this engine: prefill tokens/s, snapshot load bytes/s and overhead."""

    def __init__(self, synchronous_steps: bool = True) -> None:
        self._lock = threading.Lock()
        self.synchronous_steps = synchronous_steps
        """Whether a scheduler step's wall time is its forward pass (False under vLLM's async
        scheduling: the scheduler runs a step ahead, so no prefill rate is measured and the
        model always loads)."""
        self.prefill_tokens_per_s: float | None = None
        self.load_bytes_per_s: float | None = None
        self.load_overhead_s: float = 0.0
        self.num_loads = 0
        self._last_step: tuple[float, int] | None = None

    @staticmethod
    def _ewma(old: float | None, new: float) -> float:
        return new if old is None else (1 - _ALPHA) * old + _ALPHA * new

    def on_step(self, num_new_tokens: int, now: float | None = None) -> None:
        """Called once per scheduler step with the tokens it scheduled: the previous step's
        duration is known now, and its tokens/s feeds the prefill rate."""
        if not self.synchronous_steps:
            return
        now = time.perf_counter() if now is None else now
        with self._lock:
            if self._last_step is not None:
                began, tokens = self._last_step
                if tokens >= _MIN_PREFILL_TOKENS and now > began:
                    self.prefill_tokens_per_s = self._ewma(
                        self.prefill_tokens_per_s, tokens / (now - began)
                    )
            self._last_step = (now, num_new_tokens)

    def on_load(self, num_bytes: int, seconds: float) -> None:
        """A finished snapshot load of ``num_bytes`` that took ``seconds``. The best rate seen
        is kept: the copy path's rate is physical and stable, and only first-use work (CUDA
        host registration, kernel compilation: a first 136 MB load took 125 ms on the H200
        against 5 ms later) makes a load slower; an average would keep that outlier and then
        never load again to correct it."""
        if num_bytes <= 0 or seconds <= 0:
            return
        with self._lock:
            rate = num_bytes / seconds
            self.num_loads += 1
            if self.num_loads > 1:  # the first load pays the first-use costs
                self.load_bytes_per_s = max(self.load_bytes_per_s or 0.0, rate)

    def decide(self, num_tokens: int, num_bytes: int) -> LoadDecision:
        """Load the snapshot of ``num_tokens`` (``num_bytes``) or recompute it."""
        with self._lock:
            prefill, load = self.prefill_tokens_per_s, self.load_bytes_per_s
            overhead = self.load_overhead_s
        if prefill is None or load is None:
            return LoadDecision(True, num_tokens, num_bytes, None, None)
        load_s = num_bytes / load + overhead
        recompute_s = num_tokens / prefill
        return LoadDecision(
            load_s < recompute_s, num_tokens, num_bytes, round(load_s, 6), round(recompute_s, 6)
        )


_models: dict[str, CostModel] = {}
_models_lock = threading.Lock()


def cost_model_for(engine_key: str, synchronous_steps: bool = True) -> CostModel:
    """The process-wide model of one engine (keyed by its namespace key)."""
    with _models_lock:
        return _models.setdefault(engine_key, CostModel(synchronous_steps))
