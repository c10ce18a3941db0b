"""Fault injection on the engine side: make steps raise or hang, and model loads slow, on request.

Production code paths (error responses, readiness, liveness, drain, retries, fallbacks) are only
trusted once they have been seen to work while the engine fails. The server exposes this through
`POST /debug/faults`, and only when started with `--enable-fault-injection`; the engine consults it
once per step, on its own thread, so it acts across whatever boundary sits between server and engine.

A plan (all keys optional; `{}` clears everything):
- `step_raise: N`: the next N engine steps raise `InjectedFault`;
- `step_raise_rate: p`: every step raises with probability p (0 <= p <= 1);
- `step_hang_s: s`: the next step sleeps s seconds first (a stuck step, for liveness);
- `step_delay_s: s`: every step sleeps s seconds first, until cleared (a slow engine: requests stay in
  flight long enough to time out or to be drained);
- `layer_delay_s: s`: every decoder layer of a step's forward after the first, and its lm_head, sleeps
  s seconds first, until cleared, in the engine core process (a slow forward: requests arrive while a
  step is in flight, which under `--scheduling-policy priority` may interrupt it, engine/interrupt.py);
- `load_delay_s: s`: the next model load takes s seconds longer (for readiness; at start-up it is read
  from the environment variable SHOAL_FAULTS, a JSON plan);
- `warmup_delay_s: s`: the next warm-up takes s seconds longer (readiness says "warming up");
- `engine_die: 1`: the next step kills the engine: its thread ends, or its core process exits (for
  liveness: nothing but a restart brings it back).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, fields

ENV_PLAN = "SHOAL_FAULTS"
MAX_SECONDS = 3600.0


class InjectedFault(RuntimeError):
    """Raised by a step that a fault plan told to fail."""


class InjectedDeath(BaseException):
    """Raised by a step that a fault plan told to kill the engine: not an Exception, so the step's
    error handling (which keeps the engine going) lets it through and the engine thread or process ends."""


@dataclass
class FaultPlan:
    step_raise: int = 0
    step_raise_rate: float = 0.0
    step_hang_s: float = 0.0
    step_delay_s: float = 0.0
    layer_delay_s: float = 0.0
    load_delay_s: float = 0.0
    warmup_delay_s: float = 0.0
    engine_die: int = 0

    @classmethod
    def parse(cls, plan: dict) -> FaultPlan:
        """A validated plan; raises ValueError naming the bad key."""
        if not isinstance(plan, dict):
            raise ValueError("a fault plan is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(plan) - known)
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}; known: {', '.join(sorted(known))}")
        out = cls()
        for name, value in plan.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(out, name, int(value) if name in ("step_raise", "engine_die") else float(value))
        out._check()
        return out

    def _check(self) -> None:
        if self.step_raise < 0:
            raise ValueError(f"step_raise must be >= 0, got {self.step_raise}")
        if self.engine_die not in (0, 1):
            raise ValueError(f"engine_die must be 0 or 1, got {self.engine_die}")
        if not 0.0 <= self.step_raise_rate <= 1.0:
            raise ValueError(f"step_raise_rate must be in [0, 1], got {self.step_raise_rate}")
        for name in ("step_hang_s", "step_delay_s", "layer_delay_s", "load_delay_s", "warmup_delay_s"):
            if not 0.0 <= getattr(self, name) <= MAX_SECONDS:
                raise ValueError(f"{name} must be in [0, {MAX_SECONDS:g}] seconds, got {getattr(self, name)}")


def plan_from_env() -> dict:
    """The start-up plan: SHOAL_FAULTS as a JSON object, or no faults (ValueError if it is malformed)."""
    raw = os.environ.get(ENV_PLAN)
    try:
        plan = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV_PLAN} is not JSON: {e}") from e
    FaultPlan.parse(plan)
    return plan


class FaultInjector:
    """The current plan, shared by the server (which sets it) and the engine thread (which obeys it)."""

    def __init__(self, plan: FaultPlan | None = None, seed: int | None = None):
        self._plan = plan or FaultPlan()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    @classmethod
    def from_env(cls) -> FaultInjector:
        return cls(FaultPlan.parse(plan_from_env()))

    def set(self, plan: dict) -> dict:
        """Replace the plan (ValueError for a bad one); returns the plan now in force."""
        parsed = FaultPlan.parse(plan)
        with self._lock:
            self._plan = parsed
        return self.current()

    def current(self) -> dict:
        with self._lock:
            return asdict(self._plan)

    def before_step(self) -> None:
        """Called by the engine thread before each step: hang, then die or raise, as the plan says."""
        with self._lock:
            hang, self._plan.step_hang_s = self._plan.step_hang_s + self._plan.step_delay_s, 0.0
            die, self._plan.engine_die = self._plan.engine_die, 0
            fail = self._plan.step_raise > 0
            if fail:
                self._plan.step_raise -= 1
            elif self._plan.step_raise_rate > 0:
                fail = self._rng.random() < self._plan.step_raise_rate
        if hang:
            time.sleep(hang)
        if die:
            raise InjectedDeath("injected fault: the engine was told to die")
        if fail:
            raise InjectedFault("injected fault: this engine step was told to fail")

    def between_layers(self) -> None:
        """Called between the decoder layers of a step: sleep layer_delay_s."""
        delay = self._plan.layer_delay_s  # one float read: no lock on this per-layer path
        if delay:
            time.sleep(delay)

    def before_load(self) -> None:
        """Called before a model load: the load takes load_delay_s longer (once)."""
        self._sleep_once("load_delay_s")

    def before_warmup(self) -> None:
        """Called before the warm-up: it takes warmup_delay_s longer (once)."""
        self._sleep_once("warmup_delay_s")

    def _sleep_once(self, name: str) -> None:
        with self._lock:
            delay = getattr(self._plan, name)
            setattr(self._plan, name, 0.0)
        if delay:
            time.sleep(delay)
