"""Wires the comments service: runtime, outbox relay, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from comments import dev
from comments.api import router
from contracts.http import install_http_policy
from contracts.runtime import Runtime, health_router
from contracts.settings import Settings

# Where the gateway serves the demo page during development.
DEV_ORIGINS = ("http://127.0.0.1:8081", "http://localhost:8081")


class CommentsSettings(Settings):
    # Browser origins allowed to call this API, separated by commas.
    cors_origins: str = ""


def cors_origins(settings: Settings) -> list[str]:
    configured = getattr(settings, "cors_origins", "")
    origins = [o.strip() for o in configured.split(",") if o.strip()]
    if not origins and settings.env == "development":
        return list(DEV_ORIGINS)
    return origins


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or CommentsSettings()
    runtime = Runtime(settings, relay=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="notiflow comments", lifespan=lifespan)
    app.state.runtime = runtime
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    install_http_policy(app, settings.max_request_bytes)
    app.include_router(health_router(runtime))
    app.include_router(router)
    if settings.env == "development":
        app.include_router(dev.router)
    return app
