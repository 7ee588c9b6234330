"""What the shared HTTP policy answers before a route runs (repeated JSON keys,
loosely written path ids, repeated query parameters), and that its answers pass
through CORS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware

from contracts.auth import issue_token
from contracts.http import Cors, PathId, UserDep, install_http_policy, repeated_keys
from contracts.settings import Settings


async def sorting(order: str = "new") -> str:
    """A dependency that takes a query parameter of its own."""
    return order


class Echo:
    """An app whose routes hand back what they were given, and count their calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.app = FastAPI()
        install_http_policy(self.app, max_request_bytes=64 * 1024)

        @self.app.post("/json")
        async def as_json(payload: Annotated[Any, Body()]) -> Any:
            self.calls += 1
            return payload

        @self.app.post("/raw")
        async def as_bytes(request: Request) -> dict[str, str]:
            self.calls += 1
            return {"body": (await request.body()).decode()}

        @self.app.get("/items/{item_id}")
        async def item(item_id: PathId) -> dict[str, int]:
            self.calls += 1
            return {"id": item_id}

        @self.app.get("/page")
        async def page(
            order: Annotated[str, Depends(sorting)],
            limit: int = 20,
            tags: Annotated[list[str] | None, Query()] = None,
        ) -> dict[str, Any]:
            self.calls += 1
            return {"limit": limit, "order": order, "tags": tags}

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://t")


JSON = {"Content-Type": "application/json"}


async def chunked(body: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_a_json_body_that_repeats_a_key_is_refused_naming_the_key() -> None:
    echo = Echo()
    body = b'{"post_id": 1, "post_id": 2, "body": "x"}'

    async with echo.client() as client:
        declared = await client.post("/json", content=body, headers=JSON)
        streamed = await client.post("/json", content=chunked(body), headers=JSON)

    for resp in (declared, streamed):
        assert resp.status_code == 422
        assert resp.json() == {
            "error": "invalid_request",
            "detail": "post_id: key given more than once",
            "fields": [{"field": "post_id", "message": "key given more than once"}],
        }
    assert echo.calls == 0


async def test_a_repeated_key_is_named_by_its_path_through_objects_and_lists() -> None:
    echo = Echo()
    body = (
        b'{"keys": {"auth": "a", "p256dh": "b", "auth": "c"},'
        b' "items": [{"id": 1}, {"id": 2, "id": 3, "x": 0, "x": 0}],'
        b' "n": 1, "\\u006e": 2}'
    )

    async with echo.client() as client:
        resp = await client.post("/json", content=body, headers=JSON)

    assert resp.status_code == 422
    assert [f["field"] for f in resp.json()["fields"]] == [
        "n",
        "keys.auth",
        "items.1.id",
        "items.1.x",
    ]
    assert echo.calls == 0


async def test_a_json_body_without_repeated_keys_reaches_the_route_whole() -> None:
    echo = Echo()
    payload = {"post_id": 1, "body": "é" * 3000, "nested": [{"a": 1}, {"a": 1}]}
    body = json.dumps(payload, ensure_ascii=False).encode()
    patch = {"Content-Type": "application/merge-patch+json; charset=utf-8"}

    async with echo.client() as client:
        declared = await client.post("/json", content=body, headers=JSON)
        streamed = await client.post("/json", content=chunked(body, 100), headers=JSON)
        typed = await client.post("/json", content=body, headers=patch)
        empty = await client.post("/json", headers=JSON)

    assert [r.json() for r in (declared, streamed, typed)] == [payload] * 3
    assert empty.status_code == 422, "a missing body is still the route's to refuse"
    assert echo.calls == 3


async def test_only_json_bodies_are_checked_for_repeated_keys() -> None:
    echo = Echo()
    text = '{"a": 1, "a": 2}'

    async with echo.client() as client:
        plain = await client.post(
            "/raw", content=text, headers={"Content-Type": "text/plain"}
        )
        untyped = await client.post("/raw", content=chunked(text.encode()))

    assert [r.json() for r in (plain, untyped)] == [{"body": text}] * 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{oops", "is not valid JSON: syntax error at line 1 column 2"),
        (b'{"a": 1, "a": }', "is not valid JSON: syntax error at line 1 column 15"),
        (b"[" * 50_000, "nests arrays or objects too deeply"),
        (b"\xff\xfe{", "is not valid UTF-8: byte 0xff at offset 0"),
        (b"   ", "is not valid JSON: syntax error at line 1 column 4"),
        (b'{"a": ' + b"7" * 4301 + b"}", "has a number of more than 4300 digits"),
        # Python's parser would take these, guessing the encoding from the start.
        ('{"a": 1}'.encode("utf-16-le"), "is not valid UTF-8 JSON: byte 0x00 at"),
        ('{"a": 1}'.encode("utf-16"), "is not valid UTF-8: byte 0x"),
        ('{"a": 1}'.encode("utf-32"), "is not valid UTF-8: byte 0x"),
    ],
    ids=[
        "truncated",
        "invalid-after-repeat",
        "deep",
        "not-utf8",
        "blank",
        "long",
        "utf16le",
        "utf16-bom",
        "utf32-bom",
    ],
)
async def test_a_body_that_is_not_json_is_refused_saying_where(
    body: bytes, message: str
) -> None:
    echo = Echo()

    async with echo.client() as client:
        resp = await client.post("/json", content=body, headers=JSON)

    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_request"
    [field] = resp.json()["fields"]
    assert field["field"] == "(request body)"
    assert field["message"].startswith(message)
    assert echo.calls == 0


async def test_a_body_whose_type_is_given_twice_is_refused_naming_the_header() -> None:
    echo = Echo()
    headers = [("Content-Type", "application/json"), ("Content-Type", "text/plain")]

    async with echo.client() as client:
        resp = await client.post("/json", content=b'{"a": 1}', headers=headers)

    assert resp.status_code == 422
    assert resp.json()["fields"] == [
        {"field": "content-type", "message": "given more than once; send one"}
    ]
    assert echo.calls == 0


async def test_many_repeated_keys_get_a_short_answer() -> None:
    echo = Echo()
    body = "{" + ", ".join(f'"k{n}": 1, "k{n}": 2' for n in range(30)) + "}"

    async with echo.client() as client:
        resp = await client.post("/json", content=body, headers=JSON)

    fields = resp.json()["fields"]
    assert len(fields) == 21
    assert fields[0] == {"field": "k0", "message": "key given more than once"}
    assert fields[-1]["message"] == "and 10 more problems"


def test_repeated_keys_are_found_only_where_they_repeat() -> None:
    cases: Iterable[tuple[bytes, list[str]]] = [
        (b'{"a": {"b": 1}, "c": {"b": 1}}', []),
        (b'[{"a": 1, "a": 1}]', ["0.a"]),
        (b'{"a": 1, "a": 2, "a": 3}', ["a"]),
        (b'"a string"', []),
        (b"not json", []),
    ]

    assert [repeated_keys(body) for body, _ in cases] == [want for _, want in cases]


@pytest.mark.parametrize(
    "written",
    ["+7", "07", "%207", "7%20", "7%0A", "7.0", "0_7", "%EF%BC%97", "-7", "0x7"],
)
async def test_a_path_id_is_taken_only_in_canonical_decimal(written: str) -> None:
    echo = Echo()

    async with echo.client() as client:
        loose = await client.get(f"/items/{written}")
        exact = await client.get("/items/7")

    assert loose.status_code == 422
    assert loose.json()["fields"] == [
        {
            "field": "item_id",
            "message": "must be a whole number in the digits 0-9, "
            "with no sign, leading zeros, spaces or other characters",
        }
    ]
    assert exact.json() == {"id": 7}
    assert echo.calls == 1


async def test_a_query_parameter_given_twice_is_refused_naming_it() -> None:
    echo = Echo()

    async with echo.client() as client:
        limits = await client.get("/page?limit=5&limit=500")
        same = await client.get("/page?limit=5&order=old&limit=5")
        both = await client.get("/page?order=old&limit=1&order=new&limit=2")

    assert limits.status_code == 422
    assert limits.json() == {
        "error": "invalid_request",
        "detail": "limit: given more than once; send one value",
        "fields": [
            {"field": "limit", "message": "given more than once; send one value"}
        ],
    }
    assert same.status_code == 422
    assert [f["field"] for f in both.json()["fields"]] == ["order", "limit"]
    assert echo.calls == 0


async def test_a_list_parameter_or_a_name_no_route_takes_may_repeat() -> None:
    echo = Echo()

    async with echo.client() as client:
        tags = await client.get("/page?tags=a&limit=3&tags=b")
        unknown = await client.get("/page?limit=3&_=1&_=2")

    assert tags.json() == {"limit": 3, "order": "new", "tags": ["a", "b"]}
    assert unknown.json() == {"limit": 3, "order": "new", "tags": None}


async def test_head_answers_as_get_would_without_the_body() -> None:
    echo = Echo()

    async with echo.client() as client:
        pairs = [
            (await client.get(url), await client.head(url))
            for url in ("/page?limit=3", "/page?limit=x", "/items/7", "/nowhere")
        ]
        only_post = await client.head("/json")

    assert [get.status_code for get, _ in pairs] == [200, 422, 200, 404]
    for get, head in pairs:
        assert head.status_code == get.status_code
        assert head.headers == get.headers
        assert get.content and head.content == b""
    assert echo.calls == 4, "each HEAD runs the route as its GET does"
    assert only_post.status_code == 405
    assert only_post.headers["allow"] == "POST"
    assert only_post.content == b""


class Guarded:
    """An app with a route that takes a token and a body, and one that takes a body
    alone."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.calls = 0
        self.app = FastAPI()
        self.app.state.runtime = SimpleNamespace(settings=self.settings)
        install_http_policy(self.app, max_request_bytes=1024 * 1024)

        @self.app.post("/private")
        async def private(payload: Annotated[Any, Body()], user: UserDep) -> Any:
            self.calls += 1
            return payload

        @self.app.post("/public")
        async def public(payload: Annotated[Any, Body()]) -> Any:
            self.calls += 1
            return payload

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.mark.parametrize(
    "body",
    [b"{oops", b"\xff\xfe{", b"[" * 50_000],
    ids=["not-json", "not-utf8", "too-deep"],
)
async def test_a_route_that_takes_a_token_judges_it_before_an_unparsable_body(
    body: bytes,
) -> None:
    guarded = Guarded()
    token = issue_token(7, "bob", guarded.settings)
    good = {**JSON, "Authorization": f"Bearer {token}"}
    forged = {**JSON, "Authorization": "Bearer forged"}

    async with guarded.client() as client:
        missing = await client.post("/private", content=body, headers=JSON)
        bad = await client.post("/private", content=body, headers=forged)
        signed_in = await client.post("/private", content=body, headers=good)
        public = await client.post("/public", content=body, headers=forged)

    assert [missing.status_code, bad.status_code] == [401, 401]
    assert missing.json() == {"error": "unauthorized", "detail": "missing bearer token"}
    assert bad.json() == {"error": "unauthorized", "detail": "token is invalid"}
    assert bad.headers["www-authenticate"] == "Bearer"
    for resp in (signed_in, public):
        assert resp.status_code == 422, resp.text
        assert resp.json()["fields"][0]["field"] == "(request body)"
    assert guarded.calls == 0


PAGE = "https://app.example"


def _page_api(*, cors_first: bool) -> FastAPI:
    """An app that allows ``PAGE``, its CORS added before or after the policy."""
    app = FastAPI()

    def allow_page() -> None:
        app.add_middleware(Cors, allow_origins=[PAGE], allow_methods=["*"])

    if cors_first:
        allow_page()
    install_http_policy(app, max_request_bytes=1024)
    if not cors_first:
        allow_page()

    @app.post("/items")
    async def items(payload: Annotated[Any, Body()]) -> Any:
        return payload

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("a bug")

    return app


@pytest.mark.parametrize("cors_first", [True, False], ids=["cors-first", "cors-last"])
async def test_every_answer_carries_the_cors_headers_whichever_came_first(
    cors_first: bool,
) -> None:
    app = _page_api(cors_first=cors_first)
    # The crash is answered, then raised on to the server; the answer is wanted.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(
        transport=transport, base_url="http://t", headers={"Origin": PAGE}
    )

    async with client:
        answers = {
            200: await client.post("/items", json={"a": 1}),
            413: await client.post("/items", content=b"[" + b" " * 2000 + b"]"),
            422: await client.post("/items", content=b'{"a": 1, "a": 2}', headers=JSON),
            404: await client.get("/nowhere"),
            500: await client.get("/crash"),
        }

    for status, answer in answers.items():
        assert answer.status_code == status, answer.text
        assert answer.headers["access-control-allow-origin"] == PAGE, status
        # So that a page can read when to ask again after a 503 or 429, and
        # tell a replayed answer from the first.
        assert answer.headers["access-control-expose-headers"] == (
            "Retry-After, Idempotent-Replayed"
        )
        assert answer.headers["content-type"] == "application/json", status
    assert answers[500].json() == {
        "error": "internal_error",
        "detail": "the server failed; it has been logged",
    }


async def test_a_crash_is_logged_once_and_still_raised_to_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = httpx.ASGITransport(app=_page_api(cors_first=True))

    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="a bug"):
            await client.get("/crash")

    crashed = [
        r for r in caplog.records if r.__dict__.get("action") == "request.crashed"
    ]
    assert len(crashed) == 1


def _preflight(origin: str, method: str = "POST", **more: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, **more}


def _guarded_api(*, cors_first: bool) -> FastAPI:
    """An app that lets ``PAGE`` send GET and POST with a token, no more."""
    app = FastAPI()

    def allow_page() -> None:
        app.add_middleware(
            Cors,
            allow_origins=[PAGE],
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )

    if cors_first:
        allow_page()
    install_http_policy(app, max_request_bytes=1024)
    if not cors_first:
        allow_page()

    @app.post("/items")
    async def items(payload: Annotated[Any, Body()]) -> Any:
        return payload

    return app


@pytest.mark.parametrize("cors_first", [True, False], ids=["cors-first", "cors-last"])
async def test_a_preflight_from_an_origin_not_allowed_is_refused_in_json_naming_it(
    cors_first: bool,
) -> None:
    transport = httpx.ASGITransport(app=_guarded_api(cors_first=cors_first))

    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.options(
            "/items", headers=_preflight("https://elsewhere.example")
        )

    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert "access-control-allow-origin" not in refused.headers
    assert refused.json() == {
        "error": "cors_refused",
        "detail": "origin: 'https://elsewhere.example' is not allowed to call "
        "this service",
        "fields": [
            {
                "field": "origin",
                "message": "'https://elsewhere.example' is not allowed to call "
                "this service",
            }
        ],
    }


async def test_a_preflight_asking_for_a_method_or_header_not_allowed_names_each() -> (
    None
):
    transport = httpx.ASGITransport(app=_guarded_api(cors_first=True))
    asked = _preflight(
        PAGE, "DELETE", **{"Access-Control-Request-Headers": "authorization, X-Debug"}
    )

    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.options("/items", headers=asked)

    assert refused.status_code == 400
    # The origin is allowed; Starlette says so on the refusal, and so it stays.
    assert refused.headers["access-control-allow-origin"] == PAGE
    assert refused.json()["fields"] == [
        {
            "field": "access-control-request-method",
            "message": "'DELETE' is not allowed; allowed: GET, POST",
        },
        {
            "field": "access-control-request-headers",
            "message": "'x-debug' is not allowed; allowed: accept, accept-language, "
            "authorization, content-language, content-type",
        },
    ]


async def test_an_allowed_preflight_is_answered_as_starlette_answers_it() -> None:
    plain = FastAPI()
    plain.add_middleware(
        CORSMiddleware,
        allow_origins=[PAGE],
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization"],
    )
    asked = _preflight(PAGE, **{"Access-Control-Request-Headers": "Authorization"})

    answers = []
    for app in (plain, _guarded_api(cors_first=True)):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            answers.append(await c.options("/items", headers=asked))
    starlette, ours = answers

    assert ours.status_code == starlette.status_code == 200
    assert ours.headers == starlette.headers
    assert ours.content == starlette.content
    assert ours.headers["access-control-allow-origin"] == PAGE


async def test_a_method_not_allowed_lists_head_wherever_get_is_allowed() -> None:
    echo = Echo()

    async with echo.client() as client:
        on_a_get_route = await client.post("/page", json={})
        on_a_post_route = await client.put("/json", json={})

    assert on_a_get_route.status_code == 405
    assert on_a_get_route.json()["error"] == "method_not_allowed"
    assert on_a_get_route.headers["allow"] == "GET, HEAD"
    assert on_a_post_route.headers["allow"] == "POST"


async def test_a_method_not_allowed_lists_the_methods_of_every_route_on_the_path() -> (
    None
):
    app = FastAPI()
    install_http_policy(app)

    @app.get("/settings")
    async def read_settings() -> dict[str, str]:
        return {}

    @app.patch("/settings")
    async def change_settings() -> dict[str, str]:
        return {}

    # As a service's routes are: on a router, included under a prefix.
    items = APIRouter(prefix="/items")

    @items.delete("/{item_id}")
    async def remove(item_id: PathId) -> None:
        return None

    @items.get("/{item_id}")
    async def item(item_id: PathId) -> dict[str, int]:
        return {"id": item_id}

    app.include_router(items, prefix="/api")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        settings = await client.put("/settings", json={})
        posted = await client.post("/settings", json={})
        an_item = await client.put("/api/items/7", json={})

    assert settings.status_code == 405
    assert settings.json()["error"] == "method_not_allowed"
    assert settings.headers["allow"] == "GET, HEAD, PATCH"
    assert posted.headers["allow"] == "GET, HEAD, PATCH"
    assert an_item.status_code == 405
    assert an_item.headers["allow"] == "DELETE, GET, HEAD"


@pytest.mark.parametrize("coding", ["gzip", "br", "GZIP, identity", "identity, gzip"])
async def test_a_compressed_body_is_refused_naming_its_coding(coding: str) -> None:
    echo = Echo()

    async with echo.client() as client:
        resp = await client.post(
            "/json",
            content=b'{"a": 1}',
            headers={**JSON, "Content-Encoding": coding},
        )
        identity = await client.post(
            "/json",
            content=b'{"a": 1}',
            headers={**JSON, "Content-Encoding": "identity"},
        )

    assert resp.status_code == 415
    assert resp.json()["error"] == "unsupported_media_type"
    assert f"Content-Encoding {coding!r}" in resp.json()["detail"]
    assert identity.json() == {"a": 1}
    assert echo.calls == 1


async def test_a_path_with_a_slash_too_many_is_a_404_not_a_redirect() -> None:
    echo = Echo()

    async with echo.client() as client:
        resp = await client.get("/items/7/", headers={"Host": "elsewhere.example"})
        posted = await client.post("/json/", content=b"{}", headers=JSON)

    assert resp.status_code == posted.status_code == 404
    assert "location" not in resp.headers
    assert resp.json()["error"] == "not_found"
    assert echo.calls == 0


async def test_a_second_content_encoding_is_not_left_unread() -> None:
    echo = Echo()

    async with echo.client() as client:
        resp = await client.post(
            "/json",
            content=b'{"a": 1}',
            headers=[
                ("Content-Type", "application/json"),
                ("Content-Encoding", "identity"),
                ("Content-Encoding", "gzip"),
            ],
        )

    assert resp.status_code == 415
    assert "Content-Encoding 'identity, gzip'" in resp.json()["detail"]
    assert echo.calls == 0
