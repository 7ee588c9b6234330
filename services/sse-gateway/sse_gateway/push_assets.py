"""The push service worker, served from the root so that its scope is the page.

A service worker controls only pages under the path it was served from, so
``/static/sw.js`` could not control ``/``. Include with
``app.include_router(push_assets.router)``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

SERVICE_WORKER = Path(__file__).parent / "static" / "sw.js"

router = APIRouter(include_in_schema=False)


@router.get("/sw.js")
async def service_worker() -> FileResponse:
    # no-cache: browsers check for a new worker on every navigation anyway, but
    # an HTTP cache in between would keep serving the old one.
    return FileResponse(
        SERVICE_WORKER,
        media_type="text/javascript",
        headers={"Cache-Control": "no-cache", "Service-Worker-Allowed": "/"},
    )
