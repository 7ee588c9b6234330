"""The public HTTP routes of the services, read from the applications themselves."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

# Every replica answers these about itself; no proxy or Ingress should expose them.
OPERATIONS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# FastAPI's generated documentation: every service has its own, at the same paths.
DOCUMENTATION_PATHS = frozenset(
    {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
)

# Services whose routes browsers reach through the proxy or the Ingress.
PUBLIC_SERVICES = {"comments": "comments", "sse-gateway": "sse_gateway"}


def _walk(routes: Iterable[Any]) -> Iterator[str]:
    for route in routes:
        if hasattr(route, "path"):
            yield route.path
        elif hasattr(route, "original_router"):
            yield from _walk(route.original_router.routes)


def application_paths(module: str, env: str) -> set[str]:
    """Route templates of ``<module>.app.create_app()`` in the given mode."""
    from contracts.settings import get_settings

    saved = {
        key: os.environ.get(key) for key in ("NOTIFLOW_ENV", "NOTIFLOW_SECRET_KEY")
    }
    os.environ["NOTIFLOW_ENV"] = env
    os.environ["NOTIFLOW_SECRET_KEY"] = "deploy-tests-" + "s" * 40
    get_settings.cache_clear()
    try:
        app = importlib.import_module(f"{module}.app").create_app()
        paths = set(_walk(app.routes)) | set(app.openapi()["paths"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
    return paths


def public_paths(module: str, env: str) -> set[str]:
    return application_paths(module, env) - OPERATIONS_PATHS - DOCUMENTATION_PATHS


def sample(template: str) -> str:
    """A concrete request path for a route template."""
    path = re.sub(r"\{[^}]+\}", "1", template)
    if "." not in path.rsplit("/", 1)[-1] and template.startswith("/static"):
        path += "/app.js"
    return path
