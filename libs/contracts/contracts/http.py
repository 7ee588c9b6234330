"""What every HTTP service answers when a request is wrong or the database is away.

Errors are JSON objects with a stable ``error`` code and a ``detail`` a person can
read; validation errors list each offending field by its dotted path.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from contracts.auth import InvalidToken
from contracts.db import DatabaseUnavailable


class NotFound(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Conflict(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def error(status: int, code: str, detail: Any, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": code, "detail": detail}, status_code=status, headers=headers or None
    )


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": _field(tuple(err["loc"])), "message": err["msg"]}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse(
            {"error": "invalid_request", "detail": summary, "fields": fields},
            status_code=422,
        )

    @app.exception_handler(InvalidToken)
    async def unauthorized(_: Request, exc: InvalidToken) -> JSONResponse:
        return error(401, "unauthorized", str(exc), **{"WWW-Authenticate": "Bearer"})

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error(404, "not_found", exc.detail)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return error(409, "conflict", exc.detail)

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return error(
            503,
            "unavailable",
            "the database is unavailable; try again",
            **{"Retry-After": "2"},
        )
