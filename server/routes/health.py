"""Probes: GET /health (the process answers) and GET /ready (it can take work).

/ready is 200 only while the model is loaded, the engine's step loop is healthy and the server is
not draining; otherwise 503 with the reason, so a load balancer stops sending traffic at once.
Both stay open when an API key is configured (container health checks carry no key).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.routes import state_of

router = APIRouter()


@router.get("/health", summary="liveness: the process is up")
@router.head("/health", include_in_schema=False)  # load balancers probe with HEAD too
async def health(request: Request) -> dict:
    state = state_of(request)
    return {"status": "ok", "uptime_s": round(time.time() - state.started_at, 3)}


@router.get(
    "/ready",
    summary="readiness: model loaded, engine healthy, not draining",
    responses={503: {"description": "not ready; `reason` says why"}},
)
async def ready(request: Request) -> JSONResponse:
    state = state_of(request)
    ok, reason = state.readiness()
    body = {
        "status": "ready" if ok else "unavailable",
        "reason": reason,
        "model": state.model_id,
        "random_weights": state.random_weights,
        "in_flight": state.admission.in_flight,
    }
    return JSONResponse(body, status_code=200 if ok else 503)
