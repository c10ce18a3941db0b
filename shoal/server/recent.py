"""The last minutes of a server: a ring buffer of recent requests and engine steps, for the console.

The Prometheus histograms in /metrics are cumulative over the server's life and only good to one bucket;
the console's live view wants "TTFT P95 over the last five minutes", exactly. So the same observers that
feed the histograms (shoal/server/metrics.py: the end of each choice, each engine step) also append one
small record here. The buffers are bounded twice: by count (`deque(maxlen=...)`, so memory is fixed
however busy the server is) and by age (records older than the window are ignored when read).

Percentiles are exact over the records in the window, by the nearest-rank method (the smallest value
with at least q of the records at or below it), so that P99 of 3 records is the largest one.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from shoal.engine.stats import StepStats

WINDOW_S = 300.0  # "the last minutes" of the live view
RATE_WINDOW_S = 10.0  # tokens/s and batch size: recent enough to move when load changes
MAX_CHOICES = 10_000
MAX_STEPS = 20_000
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class ChoiceRecord:
    """One finished choice: when it ended (time.monotonic() s), TTFT and TPOT (s; None without tokens)."""

    at: float
    ttft: float | None
    tpot: float | None
    finished: bool  # stop or length, not aborted or failed


@dataclass(frozen=True)
class StepRecord:
    at: float  # time.monotonic() s at the end of the step
    batch_size: int
    prefill_tokens: int
    decode_tokens: int


def nearest_rank(values: list[float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of values by nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RecentActivity:
    """Ring buffers of recent choices and steps. Appended from the engine's step listener (another
    thread with the in-process engine) and the event loop; a lock keeps reads consistent."""

    def __init__(self, max_choices: int = MAX_CHOICES, max_steps: int = MAX_STEPS):
        self._choices: deque[ChoiceRecord] = deque(maxlen=max_choices)
        self._steps: deque[StepRecord] = deque(maxlen=max_steps)
        self._lock = threading.Lock()

    def on_choice(self, ttft: float | None, tpot: float | None, finished: bool) -> None:
        with self._lock:
            self._choices.append(ChoiceRecord(time.monotonic(), ttft, tpot, finished))

    def on_step(self, step: StepStats) -> None:
        record = StepRecord(
            time.monotonic(), step.batch_size, step.num_prefill_tokens, step.num_decode_tokens
        )
        with self._lock:
            self._steps.append(record)

    def summary(self, window_s: float = WINDOW_S, rate_window_s: float = RATE_WINDOW_S) -> dict:
        """JSON-ready: latency percentiles (seconds) over the choices that ended in the last window_s;
        token rates (per second) and the mean batch size over the steps of the last rate_window_s."""
        now = time.monotonic()
        with self._lock:
            choices = [c for c in self._choices if now - c.at <= window_s]
            steps = [s for s in self._steps if now - s.at <= rate_window_s]
        return {
            "window_s": window_s,
            "choices": len(choices),
            "ttft_s": _percentiles([c.ttft for c in choices if c.ttft is not None]),
            "tpot_s": _percentiles([c.tpot for c in choices if c.tpot is not None]),
            "rate_window_s": rate_window_s,
            "prompt_tokens_per_s": sum(s.prefill_tokens for s in steps) / rate_window_s,
            "output_tokens_per_s": sum(s.decode_tokens for s in steps) / rate_window_s,
            "steps": len(steps),
            "mean_batch_size": sum(s.batch_size for s in steps) / len(steps) if steps else 0.0,
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{round(q * 100)}": nearest_rank(values, q) for q in QUANTILES}
