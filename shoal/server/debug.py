"""Debug routes, each refused (403) unless the server was started with its flag.

- POST/GET /debug/faults: the engine's fault injection, for tests and drills (--enable-fault-injection):
  a production server must not let a client make it fail. The plan itself is the engine's
  (shoal/engine/faults.py).
Debug routes are left out of the OpenAPI schema: they are not part of the API clients build on.
- GET /debug/schedule: which requests each recent engine step ran and preempted, with their arrival
  times and priorities (--record-schedule), so that tests and tools can check scheduling order.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from fastapi import APIRouter, Body, Request

from shoal.server.errors import APIError
from shoal.server.state import ServerState, get_state

router = APIRouter()


def _engine(state: ServerState) -> Any:
    if not state.settings.enable_fault_injection or not getattr(
        state.engine, "fault_injection_enabled", False
    ):
        raise APIError(
            "fault injection is disabled: start the server with --enable-fault-injection",
            403,
            code="fault_injection_disabled",
        )
    return state.engine


@router.get("/debug/faults", include_in_schema=False)
async def get_faults(request: Request) -> dict:
    """The fault plan in force."""
    return await _engine(get_state(request)).get_faults()


@router.post("/debug/faults", include_in_schema=False)
async def set_faults(request: Request, plan: dict[str, Any] = Body(...)) -> dict:
    """Replace the plan: {"step_raise": N}, {"step_raise_rate": p}, {"step_hang_s": s},
    {"layer_delay_s": s}, {"load_delay_s": s}, or {} to clear. Returns the plan now in force."""
    engine = _engine(get_state(request))
    try:
        return await engine.set_faults(plan)
    except ValueError as e:
        raise APIError(str(e), param="faults") from e


class ScheduleRecord:
    """StepStats.admitted/preempted of the last `max_steps` steps that had any (a step listener)."""

    def __init__(self, max_steps: int = 20_000):
        self.steps: deque[dict] = deque(maxlen=max_steps)
        self._count = 0

    def on_step(self, step: Any) -> None:
        self._count += 1
        if step.admitted or step.preempted or step.added or step.interrupted:
            self.steps.append(
                {
                    "step": self._count,
                    "time": time.monotonic(),
                    "added": step.added,
                    "admitted": step.admitted,
                    "preempted": step.preempted,
                    "interrupted": step.interrupted,
                    "abandoned": step.abandoned,
                }
            )


@router.get("/debug/schedule", include_in_schema=False)
async def get_schedule(request: Request) -> dict:
    """{"steps": [{"step": n, "time": t, "added": [request_id, ...], "admitted": [[request_id,
    arrival_time, priority], ...], "preempted": [request_id, ...], "interrupted": bool, "abandoned":
    [request_id, ...]}, ...]}: the recent steps that took requests into the engine ("added" since the
    previous step), from the waiting queue ("admitted", in the order taken), preempted some, or were
    abandoned between layers for a more urgent arrival ("interrupted", with their rows' requests in
    "abandoned": none of it was computed, engine/interrupt.py), oldest first; times are the server's
    time.monotonic()."""
    record = get_state(request).schedule_record
    if record is None:
        raise APIError(
            "the schedule record is off: start the server with --record-schedule",
            403,
            code="schedule_record_disabled",
        )
    return {"steps": list(record.steps)}
