"""The demo web page: static files, and the settings the page needs to start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sse_gateway import push_assets

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


# The page acts for whoever is signed in: no other site may frame it, to have
# its buttons clicked unseen. A sign-in link carries its token in the page's
# address, which no request the page makes passes on as its Referer.
_PAGE_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(
        STATIC / "index.html", headers={"Cache-Control": "no-cache", **_PAGE_HEADERS}
    )


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    # Asked for by browsers on any page of this origin that names no icon, such as
    # a stream or a JSON answer opened directly.
    return FileResponse(
        STATIC / "icon.svg",
        media_type="image/svg+xml",
        headers={"Cache-Control": "max-age=86400"},
    )


@router.get("/config.json")
async def config(request: Request) -> dict[str, Any]:
    settings = request.app.state.runtime.settings
    return {
        "api_base_url": settings.api_base_url.rstrip("/"),
        "push_base_url": settings.push_base_url.rstrip("/"),
        # The page may ask the comments service for demo tokens only where that
        # service offers them.
        "dev_tokens": settings.env == "development",
    }


class _OneNamePerFile(StaticFiles):
    """Starlette's static files, answering each file at its one path: a slash
    added or doubled, or a ``.`` step, is a 404, as for any path no route takes.
    (An escaped slash never gets here: see :class:`contracts.http.NoEscapedSlash`.)"""

    def get_path(self, scope: Scope) -> str:
        path = get_route_path(scope)
        if path.endswith("/") or "//" in path or "/./" in path or "/../" in path:
            raise HTTPException(status_code=404)
        if path.lower() == "/index.html":
            # The page is answered at / alone, with the headers it needs there.
            raise HTTPException(status_code=404)
        return super().get_path(scope)


class WholeFiles:
    """Every file answered whole, whatever ``Range`` the request gives.

    The page's files are a few kilobytes; and Starlette answers a range of another
    unit than bytes, or a malformed one, with a plain-text 400, where RFC 9110
    (14.2) has a server ignore it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kept = [(n, v) for n, v in scope["headers"] if n not in _RANGES]
        if len(kept) != len(scope["headers"]):
            scope = {**scope, "headers": kept}

        async def unranged(message: Message) -> None:
            # Nor does it offer ranges it would not serve.
            if message["type"] == "http.response.start":
                headers = [
                    (n, v)
                    for n, v in message.get("headers", [])
                    if n.lower() != b"accept-ranges"
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, unranged)


_RANGES = (b"range", b"if-range")


def mount(app: FastAPI) -> None:
    app.add_middleware(WholeFiles)
    app.include_router(router)
    app.include_router(push_assets.router)
    app.mount("/static", _OneNamePerFile(directory=STATIC), name="static")
