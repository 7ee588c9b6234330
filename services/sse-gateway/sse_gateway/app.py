"""Wires the gateway: SSE delivery consumer, inbox listener, routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from contracts import topology
from contracts.consumer import DeadLetter
from contracts.db import transaction
from contracts.http import install_error_handlers
from contracts.messages import DeliveryRequested
from contracts.runtime import Runtime, health_router
from contracts.settings import Settings
from sse_gateway import inbox
from sse_gateway.api import router
from sse_gateway.hub import Hub, InboxListener

logger = logging.getLogger(__name__)


class GatewaySettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    sse_heartbeat_seconds: float = Field(default=15.0, gt=0, le=15.0)
    sse_retry_ms: int = Field(default=3000, ge=100)
    sse_send_timeout: float = Field(default=30.0, gt=0)
    sse_prefetch: int = Field(default=100, ge=1)
    cors_origins: str = ""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    runtime = Runtime(settings, consumers=True)
    hub = Hub()
    listener: InboxListener | None = None

    async def on_delivery(
        delivery: DeliveryRequested, _raw: AbstractIncomingMessage
    ) -> None:
        async with transaction(runtime.db) as conn:
            previous = await inbox.deliver(conn, delivery.notification_id)
        if previous == "missing":
            raise DeadLetter(f"notification {delivery.notification_id} not found")
        if previous is not None:
            logger.info(
                "notification is %s; nothing to deliver",
                previous,
                extra={"action": "sse.skipped_duplicate"},
            )
            return
        logger.info("delivered to inbox", extra={"action": "sse.delivered"})

    runtime.subscribe(
        topology.delivery_queue("sse"),
        DeliveryRequested,
        on_delivery,
        prefetch=settings.sse_prefetch,
        action="sse",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal listener
        await runtime.start()
        listener = InboxListener(settings.database_url, runtime.db, hub)
        await listener.start()
        try:
            yield
        finally:
            await listener.stop()
            await runtime.stop()

    app = FastAPI(title="notiflow sse gateway", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.hub = hub
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Last-Event-ID", "Content-Type"],
        )
    install_error_handlers(app)
    app.include_router(health_router(runtime))
    app.include_router(router)
    return app
