"""Wires the comments service: runtime, outbox relay, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from comments.api import router
from contracts.http import install_error_handlers
from contracts.runtime import Runtime, health_router
from contracts.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
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
    install_error_handlers(app)
    app.include_router(health_router(runtime))
    app.include_router(router)
    return app
