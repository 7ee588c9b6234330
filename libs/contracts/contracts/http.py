"""What every HTTP service answers when a request is wrong or the database is away.

Errors are JSON objects with a stable ``error`` code and a ``detail`` a person can
read; validation errors list each offending field by its dotted path (at most
:data:`MAX_REPORTED_FIELDS` of them, so a huge bad request cannot make a huger
answer). Request bodies above ``NOTIFLOW_MAX_REQUEST_BYTES`` are refused with 413
before they are read in full, and a JSON body that gives one key twice is refused
with 422 naming the key, before any route sees it. Ids in a path are taken only as
written in canonical decimal (:data:`PathId`). A query parameter that a route takes
one value of, given twice (``?limit=5&limit=500``), is refused with 422 naming it:
the parsers keep one of the values without a word, and which one the sender meant
cannot be known.

A ``HEAD`` request is answered as the ``GET`` of the same URL would be, status and
headers alike, without the body (:class:`HeadAsGet`): FastAPI's routes answer only
the methods they list, and ``HEAD`` would otherwise be a 405 wherever ``GET`` works.
A 405's ``Allow`` lists every method answered at the path, whichever of its routes
answers it, ``HEAD`` included wherever ``GET`` is.

A route that takes a JSON body answers 415 to a body sent as another type, or with
no ``Content-Type`` (FastAPI then does not parse it), and 422 naming the body to
one that is not UTF-8, not JSON, or not a JSON object. The parser also takes JSON in
UTF-16 or UTF-32, which it tells from the first bytes, and ignores a ``charset``
parameter: text is text whichever of those it arrived in.

A route that takes a token (one that depends on :func:`current_user`) judges it
before the body: a missing or bad token is a 401 even when the body could not be
parsed either. Three answers come before the token all the same: the 413, which
is given before a body too large is read; the 422 for a repeated key, which is
given before the request is routed, so before anyone knows whether it needed a
token (what it tells a caller without one is only that its JSON repeats a key);
and the 422 for a repeated query parameter, which comes from the first dependency
of every route (it tells no more than that).

A request that gives ``Authorization`` more than once is refused with 422 naming
it before anything else about it is judged, its tokens and its body included
(:class:`OneAuthorization`): the first header is what FastAPI's ``Header()`` and
Starlette's ``Headers.get`` read, a proxy may keep the last, and a request must
not be checked as one user and served as another.

Every answer, errors and the 500 of a crash included, passes through the CORS
middleware a service adds, so that a page on an allowed origin can read why it
was refused. A CORS preflight that middleware refuses (an origin, a method or a
header it does not allow) is a 400 in the same JSON, naming what it refused
(:class:`Cors`); one it allows is answered as Starlette answers it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence, Set
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

import asyncpg
from fastapi import Body, Depends, FastAPI, Header, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts import jsonkeys, openapi, tracing
from contracts.auth import MAX_ID, InvalidToken, Principal, bearer, verify_token
from contracts.db import (
    PASSING_ERRORS,
    SCHEMA_MISSING_ERRORS,
    UNAVAILABLE_ERRORS,
    DatabaseUnavailable,
    OutcomeUnknown,
    PoolExhausted,
    is_unavailable,
)

if TYPE_CHECKING:
    from contracts.runtime import Runtime

logger = logging.getLogger(__name__)

MAX_REPORTED_FIELDS = 20
WHOLE_BODY = "(request body)"


class NotFound(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Conflict(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TooMany(Exception):
    """A 429 under ``code``, asking the client to wait ``retry_after`` seconds."""

    def __init__(self, code: str, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


def error(status: int, code: str, detail: Any, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": code, "detail": detail}, status_code=status, headers=headers or None
    )


JSON_TYPES = "application/json (or a +json type)"
# What pydantic says of a body that is no object, when the route wants one.
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})


def _field(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "json_invalid" or loc == ("body",):
        return WHOLE_BODY
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def _message(err: dict[str, Any], exc: RequestValidationError) -> str:
    """What is wrong, in words that name the request's own mistake."""
    if err["type"] == "json_invalid":
        cause = exc.__cause__
        if isinstance(cause, json.JSONDecodeError):
            return (
                f"is not valid JSON: syntax error at line {cause.lineno} "
                f"column {cause.colno}: {cause.msg}"
            )
    if tuple(err["loc"]) == ("body",):
        if err["type"] in _NOT_AN_OBJECT:
            return f"must be a JSON object, not {_json_kind(err.get('input'))}"
        if err["type"] == "missing":
            return "must be a JSON object; the request has no body"
    # pydantic puts "Value error, " before what a validator's ValueError says.
    return str(err["msg"]).removeprefix("Value error, ")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _unparsed_body(errors: list[dict[str, Any]]) -> bool:
    """Whether the route wanted JSON and got a body FastAPI left unparsed.

    FastAPI parses a body as JSON only when its ``Content-Type`` says JSON; any
    other body reaches validation as the raw bytes.
    """
    return any(
        tuple(err["loc"]) == ("body",) and isinstance(err.get("input"), bytes)
        for err in errors
    )


def _unsupported_media_type(request: Request) -> JSONResponse:
    given = request.headers.get("content-type")
    sent = f"Content-Type {given!r}" if given else "no Content-Type"
    return error(
        415,
        "unsupported_media_type",
        f"the body must be sent as {JSON_TYPES}; the request gave {sent}",
    )


def _unreadable_body(request: Request, cause: BaseException | None) -> str | None:
    """What made FastAPI give up reading a JSON body, when the sender caused it."""
    if isinstance(cause, UnicodeDecodeError):
        known = request.scope.get("state", {}).get(_BODY_PROBLEM)
        return known or _not_utf8(bytes(cause.object)) or "is not valid UTF-8"
    return jsonkeys.beyond_limits(cause) if cause is not None else None


# Where BodyLimit keeps, in a request's scope, why its body is not UTF-8; and
# the body it hands on in its place, which no JSON parser decodes.
_BODY_PROBLEM = "notiflow.body_problem"
_UNDECODABLE = b"\xff"


def _not_utf8(body: bytes) -> str | None:
    """Why a JSON body is not UTF-8, or None if it is.

    JSON travels as UTF-8 (RFC 8259). Python's parser guesses UTF-16 or UTF-32
    from a body's first bytes, and would take such a body without a word; their
    text has NUL bytes, which no JSON text in UTF-8 has outside its strings, and
    none inside them, where control characters must be escaped.
    """
    try:
        body.decode()
    except UnicodeDecodeError as exc:
        byte = body[exc.start : exc.start + 1].hex()
        return f"is not valid UTF-8: byte 0x{byte} at offset {exc.start}"
    if (at := body.find(b"\x00")) != -1:
        return (
            f"is not valid UTF-8 JSON: byte 0x00 at offset {at} "
            "(UTF-16 and UTF-32 are not taken)"
        )
    return None


def invalid_request(problems: list[tuple[str, str]]) -> JSONResponse:
    """422 listing each ``(field, message)``, the first :data:`MAX_REPORTED_FIELDS`."""
    return _problems(422, "invalid_request", problems)


def _problems(status: int, code: str, problems: list[tuple[str, str]]) -> JSONResponse:
    """``status`` with ``code``, listing each ``(field, message)``, the first
    :data:`MAX_REPORTED_FIELDS`."""
    fields = [
        {"field": field, "message": message}
        for field, message in problems[:MAX_REPORTED_FIELDS]
    ]
    if len(problems) > MAX_REPORTED_FIELDS:
        fields.append(
            {
                "field": WHOLE_BODY,
                "message": f"and {len(problems) - MAX_REPORTED_FIELDS} more problems",
            }
        )
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return JSONResponse(
        {"error": code, "detail": summary, "fields": fields}, status_code=status
    )


def install_http_policy(
    app: FastAPI,
    max_request_bytes: int = 64 * 1024,
    *,
    body_seconds: float = 20.0,
    one_authorization: bool = True,
) -> None:
    """JSON answers for every error, the request body's limits in size and in
    time (``body_seconds`` to arrive whole), unique JSON keys and
    query parameters, one ``Authorization`` header at most (unless
    ``one_authorization`` is false, for an app that checks it itself), ``HEAD``
    wherever ``GET`` is answered, no compressed bodies, and no redirects to add or
    remove a path's final slash.

    Starlette stacks ``app.user_middleware`` outermost first, and ``add_middleware``
    puts the newest at the front. The two added here go at the back instead, so
    that the CORS middleware a service adds, before this call or after it, wraps
    their answers too. Inside them, FastAPI's exception handlers answer what a
    route raises. In a process that exports no traces, :class:`tracing.TraceContext`
    goes in front of everything, in place of FastAPI's telemetry (which the app
    should be created without: ``FastAPI(telemetry=tracing.fastapi_telemetry())``).

    A service's CORS middleware is a :class:`Cors`, which refuses a preflight in
    JSON like every other refusal, rather than Starlette's ``CORSMiddleware``.
    """
    # A path with a slash too many is a 404, as any path no route takes: Starlette
    # would redirect it, to an address built from the request's Host header.
    app.router.redirect_slashes = False
    app.user_middleware.append(Middleware(NoEscapedSlash))
    if one_authorization:
        app.user_middleware.append(Middleware(OneAuthorization))
    app.user_middleware.extend(
        [
            Middleware(ServerFailure),
            Middleware(
                BodyLimit, max_bytes=max_request_bytes, body_seconds=body_seconds
            ),
            Middleware(HeadAsGet),
        ]
    )
    # Every route included or added after this call gets it, as the services'
    # routes are; it has to be a dependency, since only the route knows which
    # names it takes one value of.
    app.router.dependencies.append(Depends(one_value_per_query_name))
    if not tracing.exporting():
        # Outermost, so that everything the request runs sees its trace.
        app.user_middleware.insert(0, Middleware(tracing.TraceContext))
    openapi.describe_errors(app)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if _unparsed_body(errors):
            return _unsupported_media_type(request)
        if any(err["type"] == "json_invalid" for err in errors) and (
            refused := await _token_refused(request)
        ):
            return refused
        return invalid_request([(_field(err), _message(err, exc)) for err in errors])

    @app.exception_handler(InvalidToken)
    async def unauthorized(_: Request, exc: InvalidToken) -> JSONResponse:
        return _unauthorized(exc)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error(404, "not_found", exc.detail)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return error(409, "conflict", exc.detail)

    @app.exception_handler(TooMany)
    async def too_many(_: Request, exc: TooMany) -> JSONResponse:
        return error(429, exc.code, exc.detail, **{"Retry-After": str(exc.retry_after)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI answers 400 "There was an error parsing the body", and no more,
        # to a JSON body it could not decode; the exception it chains says why.
        if exc.status_code == 400 and (
            problem := _unreadable_body(request, exc.__cause__)
        ):
            return await _token_refused(request) or invalid_request(
                [(WHOLE_BODY, problem)]
            )
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        code = codes.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(request, headers.get("Allow"))
        return error(exc.status_code, code, exc.detail, **headers)

    @app.exception_handler(asyncpg.DataError)
    async def bad_value(_: Request, exc: asyncpg.DataError) -> JSONResponse:
        # The last line of defence: validation should have named the field first.
        return error(422, "invalid_request", f"a value is out of range: {exc}")

    # Starlette calls this from its outermost middleware, for every exception no
    # other handler took: ServerFailure has usually answered by then, and this logs.
    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "request failed", exc_info=exc, extra={"action": "request.crashed"}
        )
        return _failed()

    async def schema_missing(_: Request, exc: Exception) -> JSONResponse:
        # A table or column dropped, or a migration rolled back, under a running
        # service: /readyz says which; each request says it is unavailable.
        logger.error(
            "the database lacks part of the schema this release needs: %s; run "
            "notiflow-migrate",
            exc,
            extra={"action": "request.schema_missing"},
        )
        return _unavailable("the service is unavailable; try again later")

    for kind in SCHEMA_MISSING_ERRORS:
        app.add_exception_handler(kind, schema_missing)

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return _unavailable(unavailable_detail(exc))

    async def perhaps_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # A statement past its command timeout, a connection refused or lost: the
        # database is away, and the request may be tried again. The same types
        # raised by other code are failures like any other.
        if not is_unavailable(exc):
            return await crashed(request, exc)
        logger.warning(
            "database unavailable: %r",
            exc,
            extra={"action": "request.database_unavailable"},
        )
        return _unavailable()

    for kind in (*UNAVAILABLE_ERRORS, *PASSING_ERRORS):
        app.add_exception_handler(kind, perhaps_unavailable)


DATABASE_AWAY = "the database is unavailable; try again"
# Seconds a 503 for the database asks the client to wait.
UNAVAILABLE_RETRY_AFTER = "2"


def unavailable_detail(exc: DatabaseUnavailable) -> str:
    """What a 503 answering ``exc`` says; the cause, which it does not, is logged."""
    logger.warning(
        "answered 503: %s", exc, extra={"action": "request.database_unavailable"}
    )
    if isinstance(exc, PoolExhausted):
        return "the service is busy; try again"
    if isinstance(exc, OutcomeUnknown):
        return exc.detail
    return DATABASE_AWAY


def _unavailable(detail: str = DATABASE_AWAY) -> JSONResponse:
    return error(503, "unavailable", detail, **{"Retry-After": UNAVAILABLE_RETRY_AFTER})


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


class NoOptions(BaseModel):
    """The body of a route that takes no options. A body that carries some (a
    filter, say) is refused rather than ignored: marking read, archiving or
    deleting the wrong things cannot be undone."""

    model_config = ConfigDict(extra="forbid")


# No body at all, or ``{}`` sent as JSON; anything else, JSON or not, is 422 (or
# 415 when not sent as JSON) before the route runs. Not optional, or a JSON
# ``null`` would pass for no body.
NoBody = Annotated[NoOptions, Body(default_factory=NoOptions)]


def _unauthorized(exc: InvalidToken) -> JSONResponse:
    return error(401, "unauthorized", str(exc), **{"WWW-Authenticate": "Bearer"})


async def _token_refused(request: Request) -> JSONResponse | None:
    """The 401 for a body that could not be parsed, when the route takes a token
    and the request's is missing or bad; None otherwise.

    FastAPI parses a JSON body before it resolves a route's dependencies, so such
    a body is refused before :func:`current_user` has looked at the token: a
    caller with no valid token would be told about its body instead.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not _takes_token(route.dependant):
        return None
    try:
        await current_user(request, request.headers.get("authorization"))
    except InvalidToken as exc:
        return _unauthorized(exc)
    return None


def _takes_token(dependant: Dependant) -> bool:
    return any(
        sub.call is current_user or _takes_token(sub) for sub in dependant.dependencies
    )


_DECIMAL = re.compile(r"0|[1-9][0-9]*")


def _canonical(value: object) -> object:
    # Left alone, the int parsing would take " 39", "+39", "039", "3_9" and "39.0"
    # for notification 39: one row with many names, each of them a guess at what
    # the sender meant.
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise ValueError(
            "must be a whole number in the digits 0-9, with no sign, leading "
            "zeros, spaces or other characters"
        )
    return value


# The id of a row in a path: a bigint above zero, written in canonical decimal
# (anything else is a 422 naming the parameter, not another name for the row).
PathId = Annotated[int, BeforeValidator(_canonical), Path(ge=1, le=MAX_ID)]

# The id of a row in a JSON body: a bigint above zero. The bounds go into the
# schema a second time under pydantic's names, as a parameter's do: FastAPI's
# OpenAPI model holds the standard ones as floats, and a float cannot hold the
# largest bigint (see contracts.openapi).
BodyId = Annotated[
    StrictInt, Field(ge=1, le=MAX_ID, json_schema_extra={"ge": 1, "le": MAX_ID})
]

# A whole number in a query string, held to the same spelling.
Whole = BeforeValidator(_canonical)


async def one_value_per_query_name(request: Request) -> None:
    """422 naming each query parameter of the route that the request repeats.

    FastAPI reads the last of a repeated parameter and a proxy or client library
    may keep the first, so ``?limit=5&limit=500`` is taken as one or the other
    without a word. A parameter declared as a list takes them all; a name the
    route does not take is ignored however often it comes, as it is once.
    """
    if b"&" not in request.scope.get("query_string", b""):
        return
    given = Counter(name for name, _ in request.query_params.multi_items())
    repeated = [name for name, count in given.items() if count > 1]
    if not repeated:
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    single = _single_valued_query(route.dependant)
    errors = [
        {
            "loc": ("query", name),
            "msg": "given more than once; send one value",
            "type": "value_error",
        }
        for name in repeated
        if name in single
    ]
    if errors:
        raise RequestValidationError(errors)


def _single_valued_query(dependant: Dependant) -> set[str]:
    """The query parameters of ``dependant`` and its dependencies that take one
    value each."""
    names: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        names.update(
            field.alias
            for field in current.query_params
            if not _many_values(field.field_info.annotation)
        )
        stack.extend(current.dependencies)
    return names


def _many_values(annotation: Any) -> bool:
    """Whether a parameter of this type takes every value given (``list[int]``,
    ``set[str] | None``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _many_values(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return any(_many_values(arg) for arg in get_args(annotation))
    kind = origin or annotation
    return (
        isinstance(kind, type)
        and issubclass(kind, (Sequence, Set))
        and not issubclass(kind, (str, bytes))
    )


def _failed() -> JSONResponse:
    return error(500, "internal_error", "the server failed; it has been logged")


class ServerFailure:
    """Answer an exception that no handler took with the JSON 500, then let it on.

    Starlette answers such an exception in its ``ServerErrorMiddleware``, which sits
    outside every middleware an app adds: that 500 would leave without the CORS
    headers, and a browser would hide it from the page as a CORS failure. Sent from
    here, inside CORS, it carries them. The exception still goes up, to the handler
    there that logs it (seeing the answer started, it sends nothing more), to
    telemetry and to the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            # Once an answer has begun, its status is sent: nothing can replace it.
            if not started:
                await _failed()(scope, receive, send)
            raise


class NoEscapedSlash:
    """Answer 404 to a path with an escaped slash or backslash (``%2F``, ``%5C``).

    uvicorn decodes them into the path the routes see, so ``/inbox%2Funread-count``
    would reach ``/inbox/unread-count``: one resource at many addresses, which
    caches, proxies' rules and logs would each take for another. As sent, they
    separate nothing, and no route of these services has a segment holding one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _escaped_slash(scope):
            await _not_found(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _escaped_slash(scope: Scope) -> bool:
    raw = scope.get("raw_path", b"").lower() if scope["type"] == "http" else b""
    return b"%2f" in raw or b"%5c" in raw


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await HeadAsGet(error(404, "not_found", "Not Found"))(scope, receive, send)


class OneAuthorization:
    """Refuse a request that gives ``Authorization`` more than once with 422 naming
    it, before anything else about the request is judged.

    Which of two tokens the sender meant cannot be known, so neither is checked
    and the answer repeats neither. A ``HEAD`` gets the 422's status and headers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _given_twice(scope, b"authorization"):
            refusal = invalid_request(
                [("authorization", "given more than once; send one")]
            )
            await HeadAsGet(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _given_twice(scope: Scope, name: bytes) -> bool:
    found = False
    for given, _ in scope["headers"]:
        if given == name:
            if found:
                return True
            found = True
    return False


def _allowed(request: Request, given: str | None) -> str:
    """The ``Allow`` of a 405: every method some route of the app answers at the
    request's path, ``HEAD`` wherever ``GET`` is (:class:`HeadAsGet` answers it),
    in alphabetical order.

    Starlette's router gives the methods of the first route whose path matched
    alone, so a path with ``GET`` on one route and ``PATCH`` on another would be
    said to take ``GET`` only. ``given``, what the refusal itself listed, is kept:
    a mounted app's 405 (static files) names methods no route of this app lists.
    """
    methods = {m.strip() for m in (given or "").split(",") if m.strip()}
    scope = request.scope
    # Matched as the app's router saw the request, before any mount it went
    # through moved the path's start into ``root_path``.
    at_app = {
        "type": "http",
        "method": scope["method"],
        "path": scope["path"],
        "root_path": scope.get("app_root_path", scope.get("root_path", "")),
    }
    # Each route as the router matches it, those of an included router too (which
    # the app's own list holds as one entry for the whole router).
    for route in iter_route_contexts(request.app.routes):
        listed = route.methods
        if listed and route.matches(at_app)[0] is not Match.NONE:
            methods.update(listed)
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


class HeadAsGet:
    """Answer ``HEAD`` by running the ``GET`` of the same URL and sending its status
    and headers without its body.

    ``Content-Length`` stays that of the ``GET``'s body, which is what it means on
    an answer to ``HEAD``. The ``GET`` runs in full, queries and all, so a route
    whose ``GET`` never ends (an event stream) must answer ``HEAD`` itself before
    this runs, as the gateway's ``/sse`` does.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
            elif not ended and not message.get("more_body", False):
                # The last part of the body, or a file handed to the server
                # whole: either way the answer ends here, empty.
                ended = True
                await send({"type": "http.response.body", "body": b""})

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, refusing a preflight with the JSON error every
    other refusal has rather than a plain-text "Disallowed CORS origin".

    The checks are Starlette's, and so are the answer's status (400) and headers:
    only the body differs, and it names each request header whose value was
    refused. A preflight that passes is answered as Starlette answers it. A browser
    never shows a page the answer to its preflight, whichever it is; the JSON is
    for the person who asks by hand why a page cannot call the service.

    A page on another origin may read ``Retry-After``, which the services send with
    a 503 or 429 to say when to ask again, and ``Idempotent-Replayed``, which tells
    a retried comment's answer from the first; a browser hides every header but a
    few from it unless told.
    """

    EXPOSED = ("Retry-After", "Idempotent-Replayed")

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        options.setdefault("expose_headers", self.EXPOSED)
        super().__init__(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A preflight is answered here, before any route is looked for: one for
        # a path with an escaped slash gets the 404 that path gets otherwise.
        if _escaped_slash(scope):
            await _not_found(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        problems = self._refused(request_headers) or [
            # A check Starlette made that this list does not know of.
            (PREFLIGHT, answer.body.decode("latin-1"))
        ]
        refusal = _problems(answer.status_code, "cors_refused", problems)
        for name, value in answer.headers.items():
            if name not in ("content-length", "content-type"):
                refusal.headers[name] = value
        return refusal

    def _refused(self, request_headers: Headers) -> list[tuple[str, str]]:
        """Each request header of a preflight whose value is refused, and why;
        the same checks, in the same order, as Starlette's."""
        problems: list[tuple[str, str]] = []
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin=origin):
            problems.append(
                ("origin", f"{_shown(origin)} is not allowed to call this service")
            )
        method = request_headers["access-control-request-method"]
        if method not in self.allow_methods:
            allowed = ", ".join(self.allow_methods)
            problems.append(
                (
                    "access-control-request-method",
                    f"{_shown(method)} is not allowed; allowed: {allowed}",
                )
            )
        asked = request_headers.get("access-control-request-headers")
        if asked is not None and not self.allow_all_headers:
            refused = [
                name.strip()
                for name in asked.lower().split(",")
                if name.strip() not in self.allow_headers
            ]
            if refused:
                names = ", ".join(_shown(name) for name in refused)
                verb = "is" if len(refused) == 1 else "are"
                allowed = ", ".join(self.allow_headers)
                problems.append(
                    (
                        "access-control-request-headers",
                        f"{names} {verb} not allowed; allowed: {allowed}",
                    )
                )
        private = request_headers.get("access-control-request-private-network")
        if private is not None and not self.allow_private_network:
            problems.append(
                (
                    "access-control-request-private-network",
                    "access from a private network is not allowed",
                )
            )
        return problems


PREFLIGHT = "(preflight)"


def _shown(value: str, limit: int = 100) -> str:
    """``value`` quoted for an error message, cut short if long."""
    return repr(value if len(value) <= limit else f"{value[:limit]}...")


class BodyLimit:
    """Refuse request bodies longer than ``max_bytes`` with 413, reading no further,
    bodies that take longer than ``body_seconds`` to arrive with 408, with 422 JSON
    bodies that give a key twice and requests that give ``Content-Type`` twice, and
    with 415 bodies sent with a ``Content-Encoding``.

    A declared ``Content-Length`` is checked before anything is read. Every body is
    then read here, up to the limit, and handed on whole: a client that stops
    sending half way would otherwise hold its connection, and the memory of what
    it sent, for as long as it likes, before anything (its token included) is
    judged. JSON parsers keep the last of two equal keys, so
    ``{"post_id": 1, "post_id": 2}`` would otherwise be taken as post 2 without a
    word; which one the sender meant cannot be known.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, body_seconds: float = 20.0
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_seconds = body_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if _given_twice(scope, b"content-type"):
            # Which type the body is in cannot be known; FastAPI would read the
            # first and say nothing of the second.
            refusal = invalid_request(
                [("content-type", "given more than once; send one")]
            )
            await refusal(scope, receive, send)
            return
        length, content_type = _header(scope, b"content-length", b"content-type")
        # Every Content-Encoding given counts: a second one would otherwise go
        # unread, as Starlette reads the first.
        codings = [v for n, v in scope["headers"] if n == b"content-encoding"]
        coding = b", ".join(codings) if codings else None
        if coding is not None and any(
            part.strip().lower() not in (b"identity", b"")
            for part in coding.split(b",")
        ):
            # Read as it came: a compressed body would be taken for its bytes.
            refusal = error(
                415,
                "unsupported_media_type",
                "the body must be sent uncompressed; the request gave "
                f"Content-Encoding {_shown(coding.decode('latin-1'))}",
            )
            await refusal(scope, receive, send)
            return
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _too_large(self.max_bytes, scope, receive, send)
                return
            if int(length) == 0:
                await self.app(scope, receive, send)
                return

        try:
            async with asyncio.timeout(self.body_seconds):
                read = await _read_body(receive, self.max_bytes)
        except TimeoutError:
            await _body_too_slow(self.body_seconds, scope, receive, send)
            return
        if read is None:
            await _too_large(self.max_bytes, scope, receive, send)
            return
        body, complete = read
        if complete and body and _is_json(content_type):
            if problem := _not_utf8(body):
                # Refused where FastAPI refuses any body it cannot read, once the
                # route has judged the token (see _token_refused), by handing it
                # one it cannot decode; the answer says what was wrong with this.
                scope.setdefault("state", {})[_BODY_PROBLEM] = problem
                body = _UNDECODABLE
            elif repeated := repeated_keys(body):
                problems = [(path, "key given more than once") for path in repeated]
                await invalid_request(problems)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _read_body(receive: Receive, max_bytes: int) -> tuple[bytes, bool] | None:
    """The body and whether it came whole (not cut short by a disconnect), or
    None once it is longer than ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_bytes:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks), True


async def _body_too_slow(
    seconds: float, scope: Scope, receive: Receive, send: Send
) -> None:
    response = error(
        408,
        "request_timeout",
        f"the request body did not arrive within {seconds:g} s "
        "(NOTIFLOW_HTTP_BODY_TIMEOUT)",
        Connection="close",
    )
    await response(scope, receive, send)


def _header(scope: Scope, *names: bytes) -> list[bytes | None]:
    """The first value of each named header, as Starlette's ``Headers.get`` reads."""
    found: list[bytes | None] = [None] * len(names)
    for name, value in scope["headers"]:
        if name in names:
            index = names.index(name)
            if found[index] is None:
                found[index] = value
    return found


def _is_json(content_type: bytes | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def repeated_keys(body: bytes) -> list[str]:
    """Where a JSON body gives a key twice, as dotted paths (``keys.auth``,
    ``items.0.id``); empty when no key is repeated, or when the body is not JSON,
    which the route's own parsing reports."""
    return [".".join((*at, key)) for at, key in jsonkeys.repeated_keys(body)]


async def _too_large(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    response = error(413, "too_large", f"the request body is larger than {limit} bytes")
    await response(scope, receive, send)
