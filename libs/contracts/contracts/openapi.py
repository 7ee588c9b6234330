"""The OpenAPI document each service serves, made to say what the service answers.

FastAPI describes its own validation error (``{"detail": [...]}``), which no notiflow
service sends: every error is :func:`contracts.http.error`'s shape. It leaves out the
refusals that do not come from validation (a token refused, a row not found, a body
too large), and writes the bounds of some parameters under pydantic's names (``ge``,
``le``), which OpenAPI tools do not read. :func:`describe_errors` wraps an app's
``openapi()`` so that the document it returns says instead:

* every error response is an ``Error``: ``error`` (a stable code), ``detail`` (for a
  person), and for a 422 ``fields``, each ``field`` with its ``message``;
* a 422 wherever FastAPI listed one, a 401 on every route that takes a token, and a
  ``default`` response, in the same shape, for every other refusal (404, 405, 409,
  413, 415, 503 and the 500 of a crash), on every route but the probes
  (``/healthz``, ``/readyz``, ``/metrics``), which answer in shapes of their own;
* parameter bounds as ``minimum`` and ``maximum``, and the bounds of body fields
  that give them under pydantic's names too (:data:`contracts.http.BodyId`)
  exactly, not as FastAPI's floats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {
            "type": "string",
            "description": "a stable code: invalid_request, unauthorized, "
            "not_found, method_not_allowed, conflict, too_large, "
            "unsupported_media_type, cors_refused, unavailable, internal_error",
        },
        "detail": {"description": "what is wrong, for a person to read"},
        "fields": {
            "type": "array",
            "description": "on a 422: each field that is wrong (its dotted path, "
            "or '(request body)' for the body as a whole) and why",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                },
            },
        },
    },
}

# Answered by the runtime in their own shapes (a readiness 503 lists what is
# missing), so left as FastAPI describes them.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_FASTAPI_ERRORS = ("HTTPValidationError", "ValidationError")
_BOUNDS = {
    "ge": "minimum",
    "le": "maximum",
    "gt": "exclusiveMinimum",
    "lt": "exclusiveMaximum",
}

INVALID = {
    "description": "The request is invalid: a field, a query parameter, a header or "
    "the body as a whole; `fields` names each problem",
    "content": _ERROR,
}
UNAUTHORIZED = {
    "description": "The token is missing, forged or expired, or names no user",
    "content": _ERROR,
}
OTHER = {
    "description": "Any other refusal, in the same shape: 404 not found, 405, "
    "409 conflict, 413 body too large, 415 not sent as JSON, 503 database "
    "unavailable (with Retry-After), 500",
    "content": _ERROR,
}


def describe_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the errors the app answers with."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = rewrite(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def rewrite(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the errors and bounds described as module docs say."""
    for path, operations in document.get("paths", {}).items():
        if path in PROBES:
            continue
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            parameters = operation.get("parameters", [])
            for parameter in parameters:
                _rename_bounds(parameter.get("schema", {}))
            responses = operation["responses"]
            if "422" in responses:
                responses["422"] = INVALID
            if any(_takes_token(parameter) for parameter in parameters):
                responses["401"] = UNAUTHORIZED
            responses["default"] = OTHER
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for schema in schemas.values():
        for field in schema.get("properties", {}).values():
            _rename_bounds(field)
    for name in _FASTAPI_ERRORS:
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    return document


def _takes_token(parameter: dict[str, Any]) -> bool:
    return (parameter.get("in"), parameter.get("name")) in {
        ("header", "authorization"),
        ("query", "token"),
    }


def _rename_bounds(schema: dict[str, Any]) -> None:
    """Bounds given under pydantic's names, exact, in place of any standard ones:
    FastAPI's model of the document turns those into floats, which cannot hold a
    bigint's (2**63 - 1 would be shown as 2**63)."""
    given = {
        standard: schema.pop(name)
        for name, standard in _BOUNDS.items()
        if name in schema
    }
    if not given:
        return
    for standard in _BOUNDS.values():
        schema.pop(standard, None)
    schema.update(given)
