"""The bearer token a request gives the gateway, read alike by every route.

A token comes in ``Authorization: Bearer …`` or, for EventSource, which cannot
set headers, in the query as ``?token=``. :class:`sse_gateway.app.GatewayApp`
and :class:`sse_gateway.stream.StreamEndpoint` both read it with :func:`given`,
so no two parts of the gateway can take two different tokens from one request.
Left to the usual parsers they would: some keep the first of a repeated name,
others the last, and a request could then be checked as one user and served as
another.

A request gives at most one token. These are refused with 422 before anything
else about the request is judged, the tokens themselves included, and the answer
never repeats a token:

- ``token`` given more than once in the query, even twice the same (``token``);
- a query ``token`` beside an ``Authorization`` header that does not carry that
  same token as its bearer token, a header of another scheme included
  (``token``); the same token both ways is taken;
- ``Authorization`` given more than once (``authorization``).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse
from starlette.types import Scope

from contracts.auth import bearer
from contracts.http import invalid_request

QUERY_NAME = "token"


class AmbiguousToken(Exception):
    """The request gives more than one token; which one it means cannot be known."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {why}" for field, why in problems))
        self.problems = problems

    def response(self) -> JSONResponse:
        """The 422 naming each field that gives a second token."""
        return invalid_request(self.problems)


class Given(NamedTuple):
    """The one token of a request, if any, and where it came from."""

    token: str | None
    # Whether it came in the query; the query without it is ``query_string``.
    in_query: bool
    query_string: bytes


def given(scope: Scope) -> Given:
    """The bearer token the request in ``scope`` gives; raises :class:`AmbiguousToken`
    when it gives more than one."""
    tokens, rest = query_tokens(scope["query_string"])
    headers = [value for name, value in scope["headers"] if name == b"authorization"]
    problems: list[tuple[str, str]] = []
    if len(tokens) > 1:
        problems.append((QUERY_NAME, "given more than once; send one token"))
    if len(headers) > 1:
        problems.append(("authorization", "given more than once; send one"))
    header = bearer(headers[0].decode("latin-1")) if headers else None
    if not problems and tokens and headers and tokens[0] != header:
        problems.append(
            (
                QUERY_NAME,
                "the Authorization header gives another; send the token one way",
            )
        )
    if problems:
        raise AmbiguousToken(problems)
    if tokens:
        return Given(tokens[0], True, rest)
    return Given(header, False, rest)


def query_tokens(query_string: bytes) -> tuple[list[str], bytes]:
    """Every ``token`` of a query, and the query without them (the same bytes when
    it has none)."""
    if not query_string:
        return [], query_string
    # Read as Starlette reads a query, so that a name it takes for "token" (such
    # as "%74oken") is found here too.
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    tokens = [value for name, value in pairs if name == QUERY_NAME]
    if not tokens:
        return [], query_string
    rest = [(name, value) for name, value in pairs if name != QUERY_NAME]
    return tokens, urlencode(rest).encode("latin-1")
