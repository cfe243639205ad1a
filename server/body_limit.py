"""The request body size limit, enforced as the body arrives (an ASGI middleware).

A declared `Content-Length` over the limit is refused before anything is read. A body without one
(chunked) is counted as it streams in; when it passes the limit, reading stops and the answer is
our 400 `body_too_large`, whatever the route would have said about the truncated body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError


class BodyTooLarge(Exception):
    pass


def _error(size: int, limit: int) -> ApiError:
    return ApiError(
        400,
        "body_too_large",
        f"request body is {size} bytes or more, over the limit of {limit}",
        "body",
        size,
        limit,
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _error(declared, self.max_bytes).response()(scope, receive, send)
            return

        received = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a cut-off body is replaced by ours below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # Frameworks may wrap our exception; once over the limit, any failure is ours.
            if not over:
                raise
        if over and not started:
            await _error(received, self.max_bytes).response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
