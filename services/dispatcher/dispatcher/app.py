"""Wires the dispatcher: consumer of CommentCreated, outbox relay, health routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI
from pydantic_settings import SettingsConfigDict

from contracts import metrics, topology
from contracts.db import transaction
from contracts.messages import CommentCreated
from contracts.runtime import Runtime, health_router
from contracts.settings import Settings
from dispatcher import channels, templates
from dispatcher.service import Dispatcher

logger = logging.getLogger(__name__)


class DispatcherSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    channel_config: Path = channels.DEFAULT_PATH
    templates_dir: Path = templates.DEFAULT_DIR
    public_url: str = "http://127.0.0.1:8081"
    dispatcher_prefetch: int = 50


def create_app(settings: DispatcherSettings | None = None) -> FastAPI:
    settings = settings or DispatcherSettings()
    runtime = Runtime(settings, relay=True, consumers=True)
    dispatcher = Dispatcher(
        channels.ChannelConfigs(settings.channel_config),
        templates.Renderer(settings.templates_dir),
        settings.public_url,
    )

    async def on_comment_created(
        event: CommentCreated, _raw: AbstractIncomingMessage
    ) -> None:
        async with transaction(runtime.db) as conn:
            outcome = await dispatcher.handle(conn, event)
        for type_, channel, status in outcome.stored:
            created = "created" if status == "pending" else status
            metrics.NOTIFICATIONS.labels(type_, channel, created).inc()
        if outcome.duplicate:
            logger.info(
                "event already dispatched", extra={"action": "dispatch.duplicate"}
            )
            return
        logger.info(
            "dispatched comment %d: %d notifications, %d to deliver, %d skipped",
            event.comment_id,
            outcome.rows,
            outcome.pending,
            outcome.skipped,
            extra={"action": "dispatch.done"},
        )

    runtime.subscribe(
        topology.DISPATCHER_QUEUE,
        CommentCreated,
        on_comment_created,
        prefetch=settings.dispatcher_prefetch,
        action="dispatch",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="notiflow dispatcher", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(health_router(runtime))
    return app
