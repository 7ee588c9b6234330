"""The smallest ASGI application: the floor any HTTP route of ours stands on.

Served by ``uvicorn bench.asgi_app:app`` in a subprocess for the baseline.
"""

from __future__ import annotations

from typing import Any

_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"11")]
_BODY = b'{"ok":true}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
