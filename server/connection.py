"""Watching the client's connection while a non-streaming answer is being computed.

A plain JSON route only writes when the answer is ready, so it would never notice a client that
gave up. `unless_disconnected` runs the work next to a task that waits for the ASGI
`http.disconnect` message (the body has been read by then, so nothing else is received) and
cancels the work when it comes; the work's own cleanup then aborts the engine request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from server.errors import ClientGone

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
        await asyncio.gather(working, watching, return_exceptions=True)
    if working.cancelled():
        raise ClientGone
    return working.result()
