"""API-key authentication: an ASGI middleware in front of every route but the probes.

With a key configured, a request must carry `Authorization: Bearer <key>`; otherwise it gets 401
before its body is read. The comparison is `hmac.compare_digest` on bytes, so its time does not
depend on how much of a guessed key is right. `/health` and `/ready` stay open for load balancers
and container health checks, and the playground page (`/`, `/static/*`) so a browser can load it.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ApiError

# Probes, and the playground page with its script and stylesheet: a browser cannot send a key for
# the page itself, and the page holds no secrets (it asks for the key and sends it on API calls).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/"})
PUBLIC_PREFIXES = ("/static/",)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
            return None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    def authorized(self, scope: Scope) -> bool:
        token = bearer_token(scope.get("headers", []))
        # compare_digest on equal-type bytes; a missing token is compared too, so timing says
        # nothing about whether a header was sent.
        return hmac.compare_digest(token or b"", self._key) and token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in PUBLIC_PATHS
            or path.startswith(PUBLIC_PREFIXES)
            or self.authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            401,
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)
