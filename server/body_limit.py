"""The request body's limits, enforced as the body arrives (an ASGI middleware): its size, its
JSON structure, and how long it may stall.

A declared `Content-Length` over the limit is refused before anything is read. A body without one
(chunked) is counted as it streams in; when it passes the limit, reading stops and the answer is
our 400 `body_too_large`, whatever the route would have said about the truncated body. The
routes' bodies are JSON, parsed on the event loop: a body of millions of tiny values (`[0,0,...]`,
or as many keys) within the size limit would hold every other request's stream for seconds (1.1 s
for 1.5M keys, 18 MB, on a 2-core VM). Its commas and colons are counted as it arrives (one
`bytes.count` per chunk); past `max_separators` it gets a 400 `body_too_complex` before anything
parses it. A real request has a few dozen outside its strings; the limit leaves room for a prompt
at the token limit made of nothing but commas (`separator_limit`). A body
that sends nothing for `timeout_s` (a client that declared 100 bytes and sent one, a slowloris)
gets a 408 `body_timeout`; uvicorn otherwise waits for it forever. Once the body is complete,
`receive` only reports the client leaving, which the routes watch for as long as they work, so
there is no timeout then.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
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


def separator_limit(max_prompt_tokens: int) -> int:
    """Commas and colons a body may hold: structure, plus a prompt at `max_prompt_tokens` whose
    every token is up to 16 of them."""
    return 100_000 + 16 * max_prompt_tokens


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, max_separators: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_separators = max_separators

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _error(declared, self.max_bytes).response()(scope, receive, send)
            return

        received = separators = 0
        failure: ApiError | None = None  # ours, replacing whatever the app answers
        complete = started = False

        async def limited_receive() -> Message:
            nonlocal received, separators, failure, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
                failure = ApiError(
                    408,
                    "body_timeout",
                    f"the request body sent nothing for {self.timeout_s:g} s "
                    f"({received} bytes arrived)",
                    "body",
                    received,
                    self.timeout_s,
                    # The rest of the body may still come: the connection cannot carry another
                    # request, and a client trickling bytes must not keep it open.
                    headers={"Connection": "close"},
                )
                raise BodyStalled from None
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                separators += chunk.count(b",") + chunk.count(b":")
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    failure = _error(received, self.max_bytes)
                    raise BodyTooLarge
                if separators > self.max_separators:
                    failure = ApiError(
                        400,
                        "body_too_complex",
                        f"request body holds {separators} or more commas and colons (JSON "
                        f"values), over the limit of {self.max_separators}",
                        "body",
                        separators,
                        self.max_separators,
                    )
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if failure is not None:
                return  # the app's answer to a cut-off body is replaced by ours below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # Frameworks may wrap our exception; once we failed the body, any failure is ours.
            if failure is None:
                raise
        if failure is not None and not started:
            await failure.response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
