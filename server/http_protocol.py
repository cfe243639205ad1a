"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head, and the uvicorn
config that serves the app through it.

uvicorn times out a keep-alive connection that goes quiet after an answer, but nothing else
before a request's headers are complete: a client that connects and sends nothing, or trickles
its headers a byte at a time (a slowloris), holds a socket and a file descriptor for as long as
it likes. Here a connection gets `head_timeout_s` from connecting, and a keep-alive connection
the same from the first byte of its next request, to complete the request line and headers;
then it gets a 408 `header_timeout` and is closed. The deadline counts the whole head, not the
pauses between its bytes: a trickle that keeps arriving does not extend it. Once the head is in,
the body's own limits take over (`body_limit.py`), and nothing limits how long the answer takes.
One more gap gets the same deadline: a request answered before its body was read (a 400 for a
body over the limit, a 404) has the rest of its body discarded as it comes, and uvicorn's
keep-alive timer is off meanwhile; past the deadline that connection is closed (no 408: it has
had its answer).

The 408 is written to the socket directly: h11 has no request to answer yet.
"""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_body
from server.settings import Settings


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps(
        error_body(
            "header_timeout",
            f"the request line and headers did not arrive within {timeout_s:g} seconds",
            408,
            "headers",
            None,
            timeout_s,
        )
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeadDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is late (see the module)."""

    head_timeout_s: float = 30.0
    timeout_response: bytes = _timeout_response(head_timeout_s)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._head_due():
            self._disarm()
        elif self._head_timer is None:
            self._arm()  # a kept-alive connection's next bytes (or a discarded body's)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _head_due(self) -> bool:
        # No request is being served: a head is awaited, or our answer went out early (a 400,
        # 404, 413) and uvicorn discards the rest of its body, cancelling its keep-alive timer.
        their, ours = self.conn.their_state, self.conn.our_state
        return their is h11.IDLE or (their is h11.SEND_BODY and ours is h11.DONE)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head_due() and not self.transport.is_closing():
            if self._awaiting_head():
                self.transport.write(self.timeout_response)
            self.transport.close()


def protocol_class(head_timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol with this deadline (uvicorn builds one instance per connection)."""
    return type(
        "HeadDeadlineProtocol",
        (HeadDeadlineProtocol,),
        {"head_timeout_s": head_timeout_s, "timeout_response": _timeout_response(head_timeout_s)},
    )


def uvicorn_config(app, settings: Settings, **kw) -> uvicorn.Config:
    """The uvicorn config that serves `app` on the settings' host and port through
    `HeadDeadlineProtocol`; `kw` goes to uvicorn as is."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(settings.header_timeout),
        **kw,
    )
