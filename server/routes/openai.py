"""OpenAI-compatible routes: POST /v1/images/generations and GET /v1/models.

An images request runs the IRG recipe (think, image, reflect, refined image) `n` times with seeds
`seed, seed+1, ...` and answers with the final refined image of each. Streaming (n = 1) sends
`image_generation.partial_image` events (the earlier rounds' finished images, then previews of
the final round, `partial_images` in all) and one `image_generation.completed`, as OpenAI does.
The request is mapped onto a `GenerateRequest`, so limits and errors are those of /generate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from irg_engine.events import Failed, Finished, ImageDone, ImagePartial
from server import caps, sse
from server.connection import unless_disconnected
from server.errors import ApiError, error_type, invalid
from server.job import KEEPALIVE, Job
from server.params import deadline_seconds, to_recipe_params
from server.protocol import (
    MAX_SEED,
    MIN_SIDE,
    ErrorResponse,
    GenerateRequest,
    ImagesRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from server.result import failure_error, failure_status, png_b64
from server.routes import state_of
from server.settings import Settings

router = APIRouter(prefix="/v1")
IRG_EXTENSIONS = frozenset({"num_timesteps", "max_think_tokens", "temperature", "refine_rounds"})
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 429, 500, 503, 504)}
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})", re.ASCII)


def parse_size(size: str, settings: Settings) -> tuple[int, int]:
    """(width, height) of a `size`; "auto" is the largest default this server takes."""
    if size == "auto":
        return settings.max_image_side, settings.max_image_side
    match = SIZE.fullmatch(size)
    width, height = (int(match[1]), int(match[2])) if match else (-1, -1)
    top = settings.max_image_side
    if not all(MIN_SIDE <= s <= top and s % 16 == 0 for s in (width, height)):
        limit = caps.size_rule(settings)
        raise invalid("size", f"size must be {limit}", size, limit)
    return width, height


def as_generate(req: ImagesRequest, seed: int, settings: Settings) -> GenerateRequest:
    # An unset size is OpenAI's 1024x1024, or less on a server capped lower.
    width, height = parse_size(req.size if "size" in req.model_fields_set else "auto", settings)
    # Only what the client set, so that defaults stay /generate's (and the server's caps).
    extensions = {name: getattr(req, name) for name in IRG_EXTENSIONS & req.model_fields_set}
    return GenerateRequest(
        prompt=req.prompt,
        recipe="irg",
        width=width,
        height=height,
        seed=seed,
        **extensions,
    )


def usage(done: list[Finished]) -> dict[str, int | dict[str, int]]:
    prompt = sum(d.usage.get("prompt_tokens", 0) for d in done)
    generated = sum(d.usage.get("generated_tokens", 0) for d in done)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},  # text prompts only
        "output_tokens": generated,
        "total_tokens": prompt + generated,
    }


def revised_prompt(done: Finished) -> str | None:
    thinks = [t["text"] for t in done.texts if t["stage"] == "think"]
    return thinks[0] if thinks else None


async def run_one(job: Job, final_round: int) -> tuple[dict, Finished]:
    async with contextlib.aclosing(job.events()) as events:
        return await _final_image(events, job, final_round)


async def _final_image(
    events: AsyncIterator[object], job: Job, final_round: int
) -> tuple[dict, Finished]:
    image = None
    async for event in events:
        if isinstance(event, ImageDone) and event.round == final_round:
            image = event.pixels
        elif isinstance(event, Failed):
            raise failure_error(event)
        elif isinstance(event, Finished):
            if image is None:
                raise ApiError(500, "engine_error", "the request finished without an image")
            data = {"b64_json": await png_b64(image), "revised_prompt": revised_prompt(event)}
            return data, event
    raise ApiError(500, "engine_error", "the engine ended the stream early")


class ImagesStream:
    """SSE frames of one streamed images request, in OpenAI's event names and payloads."""

    def __init__(
        self, job: Job, events: AsyncIterator[object], req: ImagesRequest, final_round: int
    ) -> None:
        self.job, self.events = job, events
        self.final_round, self.limit = final_round, req.partial_images
        self.meta = {
            "size": f"{job.params.width}x{job.params.height}",  # the size drawn, "auto" resolved
            # What was drawn, not what was asked: quality and background are not settings here.
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
        }
        self.ids = sse.EventIds()
        self.sent = 0
        self.image = None

    async def frames(self) -> AsyncIterator[bytes]:
        # Most engine events have no OpenAI frame: a keep-alive goes out in their place whenever
        # the stream has been quiet for the interval, as the job does while the engine is quiet.
        interval = self.job.state.settings.keepalive_interval
        written = time.monotonic()
        async with contextlib.aclosing(self.events) as events:
            async for event in events:
                frame = await self.frame(event)
                now = time.monotonic()
                if frame is None and now - written >= interval:
                    frame = sse.KEEPALIVE
                if frame is not None:
                    written = now
                    yield frame

    async def _image_frame(self, kind: str, pixels, **extra) -> bytes:
        data = {"type": kind, "b64_json": await png_b64(pixels), "created_at": int(time.time())}
        return self.ids.frame(kind, {**data, **self.meta, **extra})

    async def frame(self, event: object) -> bytes | None:
        if event is KEEPALIVE:
            return sse.KEEPALIVE
        preview = None
        if isinstance(event, ImageDone):
            if event.round == self.final_round:
                self.image = event.pixels
            else:
                preview = event.pixels
        elif isinstance(event, ImagePartial) and event.round == self.final_round:
            preview = event.pixels
        if preview is not None and self.sent < self.limit:
            self.sent += 1
            kind = "image_generation.partial_image"
            return await self._image_frame(kind, preview, partial_image_index=self.sent - 1)
        if isinstance(event, Finished) and self.image is not None:
            kind = "image_generation.completed"
            return await self._image_frame(kind, self.image, usage=usage([event]))
        if isinstance(event, Failed | Finished):
            failed = event if isinstance(event, Failed) else Failed("engine_error", "no image")
            error = {
                "code": failed.code,
                "message": failed.message,
                "type": error_type(failure_status(failed.code)),
                "request_id": self.job.id,
            }
            return self.ids.frame("error", {"type": "error", "error": error})
        return None


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
    summary="OpenAI-compatible image generation (runs the IRG recipe)",
)
async def images_generations(body: ImagesRequest, request: Request):
    state = state_of(request)
    tokenizer = state.loaded_model().tokenizer
    if body.model is not None and body.model != state.model_id:
        raise invalid("model", f"this server serves {state.model_id!r}", body.model, state.model_id)
    if body.stream and body.n != 1:
        raise invalid("n", "streaming supports n = 1", body.n, 1)
    most = state.settings.max_in_flight
    if body.n > most:  # a 429 would never clear: the n requests are admitted all or none
        message = f"n {body.n} is over the {most} requests this server holds at once"
        raise invalid("n", message, body.n, most)
    if body.seed is not None and body.seed + body.n - 1 > MAX_SEED:
        top = MAX_SEED - body.n + 1
        raise invalid("seed", f"seed + n - 1 must be <= {MAX_SEED}", body.seed, top)
    # Checked here too, under the names this request uses (partial_images is not /generate's).
    caps.capped(body, state.settings)
    base_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - 8)
    timeout = deadline_seconds(body.timeout_s, state.settings)
    params = [
        await asyncio.to_thread(
            to_recipe_params,
            as_generate(body, base_seed + i, state.settings),
            tokenizer,
            state.settings,
        )
        for i in range(body.n)
    ]
    # The rounds in force: an unset refine_rounds may have been capped lower.
    final_round = params[0].refine_rounds + 1
    if body.stream:  # the earlier rounds' images are partial images too; the rest are previews
        previews = max(0, body.partial_images - (final_round - 1))
        params = [dataclasses.replace(p, partial_images=previews) for p in params]
    tickets = state.admit_many(body.n)
    jobs = [Job(state, p, t, timeout) for p, t in zip(params, tickets, strict=True)]
    for i, job in enumerate(jobs):
        try:
            job.submit()
        except Exception:
            for other in jobs[:i] + jobs[i + 1 :]:
                other.cancel()
            raise
    if body.stream:
        stream = ImagesStream(jobs[0], await jobs[0].stream(), body, final_round)
        return sse.EventSourceResponse(stream.frames())

    async def collect() -> dict:
        tasks = [asyncio.ensure_future(run_one(job, final_round)) for job in jobs]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one failed: the others' answers are of no use any more
                task.cancel()
        answer = ImagesResponse(
            created=int(time.time()),
            data=[data for data, _ in results],
            usage=usage([done for _, done in results]),
        )
        return answer.model_dump()

    return JSONResponse(await unless_disconnected(request, collect()))


def _card(request: Request) -> ModelCard:
    state = state_of(request)
    model = state.loaded_model()
    return ModelCard(
        id=state.model_id, created=int(state.started_at), random_weights=model.random_weights
    )


@router.get("/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)
async def model(model_id: str, request: Request) -> ModelCard:
    card = _card(request)
    if model_id != card.id:
        raise ApiError(404, "model_not_found", f"this server serves {card.id!r}", "model", model_id)
    return card
