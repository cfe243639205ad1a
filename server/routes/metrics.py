"""GET /metrics: the Prometheus text exposition of this server's registry (server/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.metrics import CONTENT_TYPE
from server.routes import state_of

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)
