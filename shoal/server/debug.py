"""POST /debug/faults and GET /debug/faults: the engine's fault injection, for tests and drills.

Refused (403) unless the server was started with --enable-fault-injection: a production server must
not let a client make it fail. The plan itself is the engine's (shoal/engine/faults.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request

from shoal.server.errors import ERROR_RESPONSES, APIError
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


@router.get("/debug/faults", responses=ERROR_RESPONSES)
async def get_faults(request: Request) -> dict:
    """The fault plan in force."""
    return await _engine(get_state(request)).get_faults()


@router.post("/debug/faults", responses=ERROR_RESPONSES)
async def set_faults(request: Request, plan: dict[str, Any] = Body(...)) -> dict:
    """Replace the plan: {"step_raise": N}, {"step_raise_rate": p}, {"step_hang_s": s},
    {"load_delay_s": s}, or {} to clear. Returns the plan now in force."""
    engine = _engine(get_state(request))
    try:
        return await engine.set_faults(plan)
    except ValueError as e:
        raise APIError(str(e), param="faults") from e
