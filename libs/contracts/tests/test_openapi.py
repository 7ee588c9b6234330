"""The OpenAPI documents describe the errors the services answer with."""

from __future__ import annotations

import importlib
import json
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from contracts.auth import issue_token
from contracts.http import PathId, UserDep, install_http_policy
from contracts.openapi import PROBES
from contracts.settings import Settings, get_settings

SERVICES = ["comments", "dispatcher", "email_sender", "sse_gateway", "push_sender"]


class Note(BaseModel):
    text: str = Field(min_length=1, max_length=10)


def _noted_app() -> FastAPI:
    app = FastAPI()
    install_http_policy(app, max_request_bytes=1024)
    app.state.runtime = type("R", (), {"settings": Settings(secret_key="k" * 40)})()

    @app.post("/notes/{note_id}")
    async def change(note_id: PathId, note: Note, user: UserDep) -> dict[str, int]:
        return {"id": note_id, "user": user.user_id}

    return app


def _schema_for(document: dict[str, Any], path: str, status: int) -> dict[str, Any]:
    """The schema the document gives the answer ``status`` on ``path``'s POST."""
    responses = document["paths"][path]["post"]["responses"]
    response = responses.get(str(status), responses.get("default"))
    assert response is not None, f"{status} on {path} is not described"
    schema = response["content"]["application/json"]["schema"]
    # Resolve against the document's own components, as a client generator would.
    return {**schema, "components": document["components"]}


async def test_every_refusal_of_a_route_matches_its_document() -> None:
    app = _noted_app()
    document = app.openapi()
    token = issue_token(7, "ann", app.state.runtime.settings)
    signed = {"Authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [
            await client.post("/notes/1", json={"text": "hi"}),  # no token: 401
            await client.post(
                "/notes/1",
                json={"text": "far too long"},
                headers={"Authorization": "Bearer not-a-token"},
            ),
            await client.post("/notes/1", content=b"x" * 2000),  # 413
            await client.post("/notes/1", content=b"{}", headers=signed),  # 415
            await client.post("/notes/0", json={"text": "hi"}, headers=signed),
            await client.get("/notes/1"),  # 405
            await client.post("/nowhere", json={}),  # 404
        ]

    assert [a.status_code for a in answers] == [401, 401, 413, 415, 422, 405, 404]
    path = "/notes/{note_id}"
    for answer in answers:
        schema = _schema_for(document, path, answer.status_code)
        jsonschema.validate(answer.json(), schema)
    responses = document["paths"][path]["post"]["responses"]
    assert {"401", "422", "default"} <= set(responses)


async def test_a_422_matches_the_error_its_document_describes() -> None:
    app = _noted_app()
    document = app.openapi()
    token = issue_token(7, "ann", app.state.runtime.settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.post(
            "/notes/1",
            json={"text": "far too long"},
            headers={"Authorization": f"Bearer {token}"},
        )

    assert answer.status_code == 422
    assert answer.json()["fields"][0]["field"] == "text"
    jsonschema.validate(answer.json(), _schema_for(document, "/notes/{note_id}", 422))


def _document(module: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("NOTIFLOW_ENV", "test")
    monkeypatch.setenv("NOTIFLOW_SECRET_KEY", "openapi-tests-" + "s" * 40)
    get_settings.cache_clear()
    try:
        return importlib.import_module(f"{module}.app").create_app().openapi()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("module", SERVICES)
def test_a_service_document_names_only_the_errors_it_sends(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = _document(module, monkeypatch)
    text = json.dumps(document)

    assert "HTTPValidationError" not in text
    jsonschema.Draft202012Validator.check_schema(
        document["components"]["schemas"]["Error"]
    )
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            responses = operation["responses"]
            names = {p["name"] for p in operation.get("parameters", [])}
            for parameter in operation.get("parameters", []):
                bounds = {"ge", "le", "gt", "lt"} & set(parameter["schema"])
                assert not bounds, f"{where}: {parameter['name']} bounds {bounds}"
            if path in PROBES:
                continue
            assert "default" in responses, where
            if "authorization" in names:
                assert "401" in responses, where
            for status, response in responses.items():
                if status.startswith(("4", "5")) or status == "default":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (where, status)


@pytest.mark.parametrize("module", SERVICES)
def test_integer_bounds_are_shown_as_exact_whole_numbers(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = _document(module, monkeypatch)

    shown = list(_integer_bounds(document, "#"))
    inexact = [(where, value) for where, value in shown if not isinstance(value, int)]
    assert inexact == []


def test_a_new_comments_post_id_bounds_are_the_ones_the_service_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = _document("comments", monkeypatch)["components"]["schemas"]["NewComment"]
    post_id, body = schema["properties"]["post_id"], schema["properties"]["body"]

    # 2**63 - 1 is the largest post id taken, and 2**63 is refused: a float shows
    # both as 9.223372036854776e+18.
    assert (post_id["minimum"], post_id["maximum"]) == (1, 2**63 - 1)
    assert not {"exclusiveMinimum", "ge", "le"} & set(post_id)
    assert body["minLength"] == 1


def _integer_bounds(node: Any, where: str) -> Any:
    """(where, value) for each bound of each integer schema under ``node``."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if key in node:
                    yield f"{where}/{key}", node[key]
        for key, value in node.items():
            yield from _integer_bounds(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _integer_bounds(value, f"{where}[{index}]")
