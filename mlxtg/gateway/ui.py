"""The browser dashboard and playground: static files under /ui/, no build step, no CDN.

The page holds no data and so needs no key: every number it shows comes from the routes a
client would call (GET /admin/status, /admin/cache, /metrics, /v1/...), each behind the key,
sent by the page as a Bearer token it keeps in the browser. The Host check of `guards.py`
applies here as to every route. A strict Content-Security-Policy allows only this origin's
scripts (no inline code) and no framing, so no other site can show the Evict buttons.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse

from .errors import NotFound

STATIC = Path(__file__).parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded server serves its own page
}


def install(app: FastAPI) -> None:
    """`/` and `/ui` lead to `/ui/` (relative redirects: they also work under a path
    prefix of a reverse proxy); `/ui/<file>` serves the files of `static/`, nothing else."""
    files = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}

    def serve(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise NotFound(f"No such file in the dashboard: /ui/{name}", code="not_found")
        return FileResponse(path, media_type=_TYPES[path.suffix], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    async def ui() -> RedirectResponse:
        return RedirectResponse("ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    async def index() -> FileResponse:
        return serve("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        return serve(name)
