"""What every HTTP service answers when a request is wrong or the database is away.

Errors are JSON objects with a stable ``error`` code and a ``detail`` a person can
read; validation errors list each offending field by its dotted path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from contracts.auth import InvalidToken, Principal, bearer, verify_token
from contracts.db import DatabaseUnavailable

if TYPE_CHECKING:
    from contracts.runtime import Runtime


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


# Request dependencies are coroutines on purpose: FastAPI runs plain functions in a
# thread pool, a hand-off that costs more than the work they do.
async def current_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def current_user(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The user named by the ``Authorization: Bearer`` token, or 401."""
    return verify_token(bearer(authorization), request.app.state.runtime.settings)


RuntimeDep = Annotated["Runtime", Depends(current_runtime)]
UserDep = Annotated[Principal, Depends(current_user)]
