"""POST /generate: one recipe run, answered as one JSON object or streamed as server-sent events.

Flow: body (validated by pydantic) -> `params.to_recipe_params` (model- and settings-dependent
limits, in a worker thread since it may decode an image) -> admission ticket -> `Job.submit` ->
either `Result` (JSON, watched for a client disconnect) or SSE frames from `result.event_payload`.
A streaming request looks at its first engine event before answering (`Job.stream`), so a request
that fails at once still gets a plain HTTP error rather than a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import sse
from server.connection import unless_disconnected
from server.job import KEEPALIVE, Job
from server.params import deadline_seconds, to_recipe_params
from server.protocol import ErrorResponse, GenerateRequest, GenerateResponse
from server.result import Result, event_payload
from server.routes import state_of

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 429, 500, 503, 504)}
STREAM_DOC = {
    "description": "the JSON answer, or with stream (or Accept: text/event-stream) an SSE stream",
    "content": {"text/event-stream": {}},
}


def wants_stream(body_stream: bool, request: Request) -> bool:
    return body_stream or "text/event-stream" in request.headers.get("accept", "")


async def frames(job_events: AsyncIterator[object], job: Job, model: str) -> AsyncIterator[bytes]:
    ids = sse.EventIds()
    async with contextlib.aclosing(job_events) as events:
        async for event in events:
            if event is KEEPALIVE:
                yield sse.KEEPALIVE
                continue
            payload = await event_payload(event, job.id, model)
            if payload is not None:
                yield ids.frame(*payload)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: STREAM_DOC, **ERRORS},
    summary="Run a recipe (IRG by default); JSON or server-sent events",
)
async def generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    tokenizer = state.loaded_model().tokenizer
    params = await asyncio.to_thread(to_recipe_params, body, tokenizer, state.settings)
    timeout = deadline_seconds(body.timeout_s, state.settings)
    job = Job(state, params, state.admit(), timeout)
    job.submit()
    if wants_stream(body.stream, request):
        return sse.EventSourceResponse(frames(await job.stream(), job, state.model_id))

    events = job.events()
    result = Result(job.id, state.model_id)

    async def collect() -> dict:
        async for event in events:
            if event is not KEEPALIVE:
                await result.add(event)
        return result.answer()

    return JSONResponse(await unless_disconnected(request, collect()))
