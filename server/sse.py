"""Server-sent events: frame encoding and a response that notices a client going away.

A frame is `id: N`, `event: NAME`, `data: JSON` and a blank line; ids increase by one per frame
within a response (`EventIds`). Keep-alive frames are SSE comments, ignored by browsers.

`EventSourceResponse` streams an async iterator of frames while it listens for the client's
disconnect. When the client leaves, the iterator is cancelled and closed at once, so its cleanup
(aborting the engine request, freeing its KV blocks) runs immediately rather than at the next
write that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

KEEPALIVE = b": keep-alive\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    # Proxies such as nginx buffer responses unless told not to; a buffered stream is no stream.
    "X-Accel-Buffering": "no",
}


class EventIds:
    """Monotonic event ids of one stream."""

    def __init__(self) -> None:
        self.last = 0

    def frame(self, event: str, data: dict) -> bytes:
        self.last += 1
        return encode(event, data, self.last)


def encode(event: str, data: dict, id: int | None = None) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"id: {id}\n" if id is not None else ""
    # json.dumps never emits a raw newline, so one data line carries the whole payload.
    return f"{head}event: {event}\ndata: {payload}\n\n".encode()


class EventSourceResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], status_code: int = 200) -> None:
        super().__init__(frames, status_code=status_code, headers=HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if streaming.done() and not streaming.cancelled():
            exc = streaming.exception()
            if exc is not None and not isinstance(exc, OSError):
                raise exc
