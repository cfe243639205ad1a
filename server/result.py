"""Engine events -> what clients see: SSE payloads of `/generate` and its one-shot JSON answer.

`event_payload` maps each engine event to an SSE event name and its JSON data (None: not shown to
clients). `Result` gathers a job's events into the `GenerateResponse` of a non-streaming request.
Pixels become base64 PNG in a worker thread, so a 1024x1024 encode never stalls the event loop.
`failure_status` gives the HTTP status of a request that failed before any byte was sent.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from irg_engine import images
from irg_engine.events import (
    Failed,
    Finished,
    ImageDone,
    ImagePartial,
    ImageProgress,
    Queued,
    TextDelta,
    TextDone,
)
from server.errors import ApiError

FAILURE_STATUS = {
    "timeout": 504,
    "shutdown": 503,
    "engine_error": 500,
    "invalid_request": 400,
    "aborted": 500,
}


async def png_b64(pixels: np.ndarray) -> str:
    def encode() -> str:
        return base64.b64encode(images.encode_png(pixels)).decode("ascii")

    return await asyncio.to_thread(encode)


def summary(request_id: str, model: str, done: Finished) -> dict:
    """The answer without the images: the `done` event, and the JSON answer minus `images`."""
    return {
        "id": request_id,
        "model": model,
        "texts": [dict(t) for t in done.texts],
        "seed": done.seed,
        "timings": dict(done.timings),
        "usage": dict(done.usage),
    }


async def event_payload(event: object, request_id: str, model: str) -> tuple[str, dict] | None:
    rid = {"request_id": request_id}
    if isinstance(event, Queued):
        return "queued", {**rid, "position": event.position}
    if isinstance(event, TextDelta):
        return "text.delta", {
            **rid,
            "stage": event.stage,
            "round": event.round,
            "delta": event.delta,
        }
    if isinstance(event, TextDone):
        return "text.done", {**rid, "stage": event.stage, "round": event.round, "text": event.text}
    if isinstance(event, ImageProgress):
        data = {"round": event.round, "step": event.step, "total_steps": event.total_steps}
        return "image.progress", {**rid, **data}
    if isinstance(event, ImagePartial):
        data = {"round": event.round, "index": event.index, "b64_png": await png_b64(event.pixels)}
        return "image.partial", {**rid, **data}
    if isinstance(event, ImageDone):
        h, w = event.pixels.shape[:2]
        data = {"round": event.round, "b64_png": await png_b64(event.pixels)}
        return "image.done", {**rid, **data, "width": w, "height": h}
    if isinstance(event, Finished):
        return "done", {**rid, **summary(request_id, model, event)}
    if isinstance(event, Failed):
        return "error", {**rid, "code": event.code, "message": event.message}
    return None  # Started: internal


def failure_status(code: str) -> int:
    return FAILURE_STATUS.get(code, 500)


def failure_error(failed: Failed) -> ApiError:
    # OpenAI's clients retry every 5xx twice unless told not to: a request that ran out of its
    # own deadline would run in full again each time.
    headers = {"x-should-retry": "false"} if failed.code == "timeout" else None
    return ApiError(failure_status(failed.code), failed.code, failed.message, headers=headers)


class Result:
    """The non-streaming answer, built up as the job's events pass."""

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self.images: list[dict] = []
        self.done: Finished | None = None
        self.failed: Failed | None = None

    async def add(self, event: object) -> None:
        if isinstance(event, ImageDone):
            h, w = event.pixels.shape[:2]
            b64 = await png_b64(event.pixels)
            self.images.append({"round": event.round, "b64_png": b64, "width": w, "height": h})
        elif isinstance(event, Finished):
            self.done = event
        elif isinstance(event, Failed):
            self.failed = event

    def answer(self) -> dict:
        """The JSON answer, or the ApiError of the failure."""
        if self.done is None:
            raise failure_error(self.failed or Failed("engine_error", "no result"))
        return {**summary(self.request_id, self.model, self.done), "images": self.images}
