"""The playground: GET / answers the page (server/static/index.html), GET /static/NAME its script
and stylesheet.

The page is self-contained: plain HTML, CSS and one script, no build step, nothing fetched from
elsewhere; its Content-Security-Policy says so to the browser as well. It talks to the API with
relative URLs (`generate`, `ready`), so it also works behind a proxy that mounts the server under
a path prefix. Only the files named in `ASSETS` are served: no path from the URL reaches the disk.
None of these routes appear in the OpenAPI schema (they are not API).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import ApiError

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Same-origin everything; images arrive as data: URLs and downloads are blob: URLs.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load (FileResponse sends ETag / Last-Modified): an upgraded server
    # never runs an old script against a new API.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(
        STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS
    )


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
