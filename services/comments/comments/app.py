"""Wires the comments service: runtime, outbox relay, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from comments import dev
from comments.api import router
from comments.keys import KeySweeper
from contracts import tracing
from contracts.http import Cors, install_http_policy
from contracts.runtime import Runtime, health_router, stop_in_order
from contracts.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings, relay=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        sweeper = KeySweeper(runtime.db, settings.idempotency_key_hours)
        sweeper.start()
        try:
            yield
        finally:
            await stop_in_order(sweeper.stop, runtime.stop)

    app = FastAPI(
        title="notiflow comments",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),
    )
    app.state.runtime = runtime
    origins = settings.allowed_origins
    if origins:
        app.add_middleware(
            Cors,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    install_http_policy(
        app, settings.max_request_bytes, body_seconds=settings.http_body_timeout
    )
    app.include_router(health_router(runtime))
    app.include_router(router)
    if settings.env == "development":
        app.include_router(dev.router)
    return app
