"""Wires the dispatcher: consumer of CommentCreated, outbox relay, health routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from contracts import metrics, topology, tracing
from contracts.consumer import DeadLetter, Item
from contracts.db import connection
from contracts.http import install_http_policy
from contracts.messages import MAX_BATCH_DELIVERIES, CommentCreated
from contracts.runtime import Runtime, health_router
from contracts.settings import MAX_PREFETCH, Settings, WebUrl, prefetch_holds_batch
from contracts.tasks import stop_task
from dispatcher import channels, templates
from dispatcher.service import Dispatcher, Outcome

logger = logging.getLogger(__name__)

# Batches handled at once; while they run, the next one gathers.
BATCH_WORKERS = 2
# How often the channel configuration and its templates are looked at between
# events; an edit on disk this long is the last good version of every dispatcher.
CONFIG_CHECK_SECONDS = 1.0


class DispatcherSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    # Before the channel configuration, which is checked against it.
    templates_dir: Path = Field(default=templates.DEFAULT_DIR, validate_default=True)
    channel_config: Path = Field(default=channels.DEFAULT_PATH, validate_default=True)
    public_url: WebUrl = "http://127.0.0.1:8081"
    # Room for two running batches and one gathering. Events held unacked do not
    # count against the queue's delivery limit; only a return (a dispatcher that
    # dies, a shutdown during a database outage) does, once per event held.
    dispatcher_prefetch: int = Field(default=150, ge=1, le=MAX_PREFETCH)
    dispatcher_batch_size: int = Field(default=50, ge=1)
    # Deliveries of one channel type and priority, of the events dispatched
    # together, that travel in one message;
    # 1 sends a message per row, which senders older than DeliveryBatch need.
    dispatcher_deliveries_per_message: int = Field(
        default=100, ge=1, le=MAX_BATCH_DELIVERIES
    )

    @field_validator("templates_dir", "channel_config", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        # An empty path would be read as the working directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; name a path, or leave it unset for the default")
        return value

    @field_validator("templates_dir")
    @classmethod
    def _templates_dir_exists(cls, value: Path) -> Path:
        try:
            found = value.is_dir()
        except OSError as exc:  # a name too long for the file system, say
            raise ValueError(f"{value} cannot be looked up: {exc.strerror}") from None
        if not found:
            raise ValueError(f"{value} is not a directory")
        return value

    # The channel configuration as the check below read it. The dispatcher starts
    # with it rather than reading the file a second time, which might by then
    # hold an edit no check has seen.
    _channels: channels.Loaded | None = PrivateAttr(default=None)
    _renderer: templates.Renderer | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _prefetch_holds_a_batch(self) -> DispatcherSettings:
        prefetch_holds_batch(
            "dispatcher", self.dispatcher_prefetch, self.dispatcher_batch_size
        )
        return self

    @model_validator(mode="after")
    def _channel_config_usable(self) -> DispatcherSettings:
        """Refuse to start on a configuration a reload would refuse."""
        self._renderer = templates.Renderer(
            self.templates_dir, settle_seconds=templates.SETTLE_SECONDS
        )
        try:
            self._channels = channels.load(self.channel_config, self._renderer.problem)
        except channels.ConfigError as exc:
            # A model's own error names no field; the line must name the setting.
            raise ValueError(f"NOTIFLOW_CHANNEL_CONFIG: {exc}") from None
        return self

    @property
    def channels_at_start(self) -> channels.Loaded | None:
        """The channel configuration read when these settings were checked."""
        return self._channels

    @property
    def renderer(self) -> templates.Renderer:
        """The renderer that checked the templates the configuration names, and
        so holds a version of each that rendered."""
        if self._renderer is None:
            self._renderer = templates.Renderer(
                self.templates_dir, settle_seconds=templates.SETTLE_SECONDS
            )
        return self._renderer


def create_app(settings: DispatcherSettings | None = None) -> FastAPI:
    settings = settings or DispatcherSettings()
    runtime = Runtime(settings, relay=True, consumers=True)
    renderer = settings.renderer
    dispatcher = Dispatcher(
        channels.ChannelConfigs(
            settings.channel_config, renderer.problem, settings.channels_at_start
        ),
        renderer,
        settings.public_url,
        secret_key=settings.secret_key,
        per_message=settings.dispatcher_deliveries_per_message,
    )

    async def on_comments_created(
        items: Sequence[Item[CommentCreated]],
    ) -> list[Exception | None]:
        events = [item.message for item in items]
        traces = [item.within(tracing.inject) for item in items]
        relay = runtime.relay
        outbox: list[Mapping[str, Any]] | None = [] if relay is not None else None
        async with connection(runtime.db) as conn:
            results = await dispatcher.handle_many(
                conn, events, traces=traces, outbox=outbox
            )
        if relay is not None and outbox:
            # Committed: this process's relay publishes the deliveries now.
            relay.hand_off(outbox)

        answers: list[Exception | None] = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, DeadLetter):
                answers.append(result)
                continue
            for type_, channel, status in result.stored:
                created = "created" if status == "pending" else status
                metrics.NOTIFICATIONS.labels(type_, channel, created).inc()
            item.within(_log, item.message, result)
            answers.append(None)
        return answers

    runtime.subscribe_batch(
        topology.DISPATCHER_QUEUE,
        CommentCreated,
        on_comments_created,
        prefetch=settings.dispatcher_prefetch,
        max_batch=settings.dispatcher_batch_size,
        workers=BATCH_WORKERS,
        action="dispatch",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        watcher = asyncio.create_task(_keep_looking(dispatcher), name="config watch")
        try:
            yield
        finally:
            await stop_task(watcher, "the configuration watch")
            await runtime.stop()

    app = FastAPI(
        title="notiflow dispatcher",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),
    )
    app.state.runtime = runtime
    install_http_policy(
        app, settings.max_request_bytes, body_seconds=settings.http_body_timeout
    )
    app.include_router(health_router(runtime))
    return app


async def _keep_looking(dispatcher: Dispatcher) -> None:
    """Take up edits of the configuration and templates whether events come or
    not (:meth:`Dispatcher.refresh`)."""
    while True:
        await asyncio.sleep(CONFIG_CHECK_SECONDS)
        try:
            dispatcher.refresh()
        except Exception:
            logger.exception(
                "could not look at the channel configuration",
                extra={"action": "channels.watch_failed"},
            )


def _log(event: CommentCreated, outcome: Outcome) -> None:
    if outcome.duplicate:
        logger.info("event already dispatched", extra={"action": "dispatch.duplicate"})
        return
    logger.info(
        "dispatched comment %d: %d notifications, %d to deliver, %d skipped",
        event.comment_id,
        outcome.rows,
        outcome.pending,
        outcome.skipped,
        extra={"action": "dispatch.done"},
    )
