"""The status page's routes on the public port: its three files (no data in them,
so anyone may fetch them) and its stream, for operators only."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ssw.gateway.board.stream import Board

if TYPE_CHECKING:
    from ssw.gateway.handler import Gateway

STREAM_PATH = "/ui/stream"
PAGE_FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/ui/page.css": ("page.css", "text/css; charset=utf-8"),
}
# The page runs only its own script and talks only to its own origin; nobody frames it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install_page(app: FastAPI, gw: Gateway, board: Board) -> None:
    static = resources.files("ssw.gateway.board") / "static"
    # Read once at start: a few kilobytes, served from memory.
    files = {path: (static.joinpath(name).read_bytes(), kind) for path, (name, kind) in PAGE_FILES.items()}

    def serve(path: str) -> None:
        body, kind = files[path]

        async def page_file() -> Response:
            return Response(body, media_type=kind, headers=SECURITY_HEADERS)

        app.add_api_route(path, page_file, methods=["GET"], include_in_schema=False)

    for path in files:
        serve(path)

    @app.get(STREAM_PATH, include_in_schema=False)
    async def stream(request: Request) -> StreamingResponse:
        await gw.admission.operator(request.headers.raw)
        return StreamingResponse(
            board.stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
