"""The FastAPI application: routes, error handlers, middlewares and the lifespan, wired together.

`create_app(settings, model=None)` builds one server. Middlewares, outermost first: API key (a
401 costs nothing), body size limit, then FastAPI. The lifespan starts the engine (loading the
model first, in a worker thread, when none was passed in: /health answers and /ready says
"loading model" meanwhile) and drains it on the way out. The OpenAPI schema states this server's
caps (`caps.advertise`). The server's state lives on `app.state.irg`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from irg_engine.model.bagel import LoadedModel
from server import caps, errors
from server.auth import ApiKeyMiddleware
from server.body_limit import BodyLimitMiddleware, separator_limit
from server.routes import generate, health, metrics, openai, playground
from server.settings import Settings
from server.state import ServerState

VERSION = "0.1.0"


def create_app(
    settings: Settings,
    model: LoadedModel | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    state = ServerState(settings, model=model, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = None
        if state.model is not None:
            state.start()  # ready as soon as the socket is open
        else:
            loading = asyncio.ensure_future(state.load_and_start())
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                await asyncio.wait({loading}, timeout=1.0)
            await state.close()

    app = FastAPI(
        title="IRG server",
        version=VERSION,
        summary="Interleaving Reasoning Generation: think, draw, reflect, redraw; streamed",
        lifespan=lifespan,
    )
    app.state.irg = state

    def openapi() -> dict:
        # Built once, then saying this server's caps rather than the model's limits.
        if app.openapi_schema is None:
            caps.advertise(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi
    errors.install(app)
    for module in (generate, openai, health, metrics, playground):
        app.include_router(module.router)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout,
        max_separators=separator_limit(settings.max_prompt_tokens),
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)  # added last: outermost
    return app
