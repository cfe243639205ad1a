"""HTTP routes, one module per area: generate, openai, health, metrics.

Routes find the server's state on `request.app.state.irg` (a `ServerState`).
"""

from __future__ import annotations

from starlette.requests import Request

from server.state import ServerState


def state_of(request: Request) -> ServerState:
    return request.app.state.irg
