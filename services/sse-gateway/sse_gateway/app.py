"""Wires the gateway: SSE delivery consumer, inbox listener, sweeper, routes.

The sweeper publishes again the delivery of an SSE row left ``pending`` too long (its
message lost with the classic delivery queue) through the outbox; the gateway has no
relay of its own, so another service's relay hears the commit and publishes it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts import metrics, topology, tracing
from contracts.consumer import DeadLetter, Item
from contracts.db import GENERIC_PLANS, connection
from contracts.http import Cors, HeadAsGet, install_http_policy
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.recovery import LeaseSweeper
from contracts.runtime import Runtime, health_router
from contracts.settings import MAX_PREFETCH, Settings, WebUrl, prefetch_holds_batch
from sse_gateway import credentials, inbox, unsubscribe, web
from sse_gateway.api import router
from sse_gateway.hub import Hub, InboxListener
from sse_gateway.stream import StreamEndpoint

logger = logging.getLogger(__name__)


class GatewaySettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    sse_heartbeat_seconds: float = Field(default=15.0, gt=0, le=15.0)
    sse_retry_ms: int = Field(default=3000, ge=100)
    sse_send_timeout: float = Field(default=30.0, gt=0)
    sse_prefetch: int = Field(default=100, ge=1, le=MAX_PREFETCH)
    # Deliveries put into inboxes by one transaction, at most. A batch is whatever
    # is waiting when a worker is free; nothing waits for it to fill.
    sse_batch_size: int = Field(default=100, ge=1)
    # Streams one user may hold open on one replica; the next is answered 429.
    sse_max_streams_per_user: int = Field(default=20, ge=1)
    # How often the sweeper looks for SSE rows whose message was lost.
    sse_sweep_seconds: float = Field(default=15.0, gt=0)
    # False serves streams with sse-starlette's stock response (four tasks per
    # stream); kept to measure against, see bench/sse_fanout.py.
    sse_lean: bool = True
    # Where the web page finds the comments API.
    api_base_url: WebUrl = "http://127.0.0.1:8080"
    # Where the page's Web Push controls find the push sender.
    push_base_url: WebUrl = "http://127.0.0.1:8084"

    @model_validator(mode="after")
    def _prefetch_holds_a_batch(self) -> GatewaySettings:
        prefetch_holds_batch("sse", self.sse_prefetch, self.sse_batch_size)
        return self


class GatewayApp(FastAPI):
    """FastAPI, with ``/sse`` answered ahead of it and query tokens kept out of URLs.

    Streams go straight to :class:`StreamEndpoint`, which holds far less per idle
    connection than a FastAPI route; only an ``OPTIONS`` to ``/sse`` (a browser's
    CORS preflight) takes the usual way, through the app's CORS middleware. On
    every other route a ``?token=`` is moved into the Authorization header first:
    FastAPI's own telemetry (on when traces are exported) records the query of
    each request on its server span before any middleware runs, and redacts only
    a fixed list of names. A request that gives more than one token is answered
    422 here, before anything else judges it (see :mod:`sse_gateway.credentials`),
    with the CORS headers of any other answer. The token of an unsubscribe link,
    which is no bearer token, goes into the scope instead, and its Authorization
    headers are not read (see :mod:`sse_gateway.unsubscribe`).
    """

    sse: StreamEndpoint | None = None
    # The options of the app's CORS middleware, when it has one.
    cors: dict[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] == "/sse" and self.sse is not None:
                if scope["method"] != "OPTIONS":
                    await self.sse(scope, receive, send)
                    return
                # A preflight holds no stream open: it goes through the CORS
                # middleware as on any other route, and any other OPTIONS on to
                # the listed route, which refuses it with 405.
            if scope["path"] == unsubscribe.PATH:
                scope = _link_token_to_scope(scope)
            else:
                try:
                    scope = _token_to_header(scope, credentials.given(scope))
                except credentials.AmbiguousToken as problem:
                    await self._refuse(problem, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _refuse(
        self,
        problem: credentials.AmbiguousToken,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        # Outside the app's middleware, so its CORS middleware is put around the
        # answer here; a browser's preflight is answered by it as usual.
        answer: ASGIApp = HeadAsGet(problem.response())
        if self.cors is not None:
            answer = Cors(answer, **self.cors)
        await answer(scope, receive, send)


def _token_to_header(scope: Scope, given: credentials.Given) -> Scope:
    """The scope with a query's token in Authorization alone."""
    if not given.in_query:
        return scope
    headers = list(scope["headers"])
    if given.token is not None and not any(n == b"authorization" for n, _ in headers):
        # UTF-8, since a query may hold what latin-1 cannot: read back as latin-1,
        # such a token is no token, and is refused as invalid.
        headers.append((b"authorization", f"Bearer {given.token}".encode()))
    return {**scope, "headers": headers, "query_string": given.query_string}


def _link_token_to_scope(scope: Scope) -> Scope:
    """The scope with an unsubscribe link's tokens moved from the query to their
    own key: such a token is no bearer token, and must not be taken for one."""
    tokens, rest = credentials.query_tokens(scope["query_string"])
    return {**scope, unsubscribe.LINK_TOKEN: tokens, "query_string": rest}


def _settled(
    delivery: DeliveryRequested, previous: str | None, batch: int
) -> Exception | None:
    """Log and count one delivery of a batch; what its message's consumer must do."""
    if previous == "missing":
        return DeadLetter(f"notification {delivery.notification_id} not found")
    if previous is not None and previous.startswith(inbox.OTHER_TYPE.format(type="")):
        # Routed to the wrong queue: no delivery of SSE rows can ever take it.
        return DeadLetter(
            f"notification {delivery.notification_id} is {previous}, not sse"
        )
    if previous is not None:
        logger.info(
            "notification is %s; nothing to deliver",
            previous,
            extra={"action": "sse.skipped_duplicate"},
        )
        return None
    metrics.delivered("sse", delivery.channel, delivery.event_occurred_at)
    logger.info(
        "delivered to inbox in a batch of %d",
        batch,
        extra={"action": "sse.delivered"},
    )
    return None


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    runtime = Runtime(
        settings,
        consumers=True,
        pool_options={"server_settings": GENERIC_PLANS},
    )
    hub = Hub(settings.sse_heartbeat_seconds, settings.sse_send_timeout)
    listener: InboxListener | None = None

    async def on_deliveries(
        items: Sequence[Item[DeliveryRequested]],
    ) -> list[Exception | None]:
        ids = [item.message.notification_id for item in items]
        # One statement, which commits on its own: no BEGIN and COMMIT around it.
        async with connection(runtime.db) as conn:
            previous = await inbox.deliver_many(conn, ids)
        return [
            item.within(_settled, item.message, before, len(items))
            for item, before in zip(items, previous, strict=True)
        ]

    runtime.subscribe_batch(
        topology.delivery_queue("sse"),
        DeliveryRequested,
        on_deliveries,
        prefetch=settings.sse_prefetch,
        max_batch=settings.sse_batch_size,
        action="sse",
        envelope=DeliveryBatch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal listener
        # Each part is stopped, last started first, whatever the others do.
        async with contextlib.AsyncExitStack() as parts:
            await runtime.start()
            parts.push_async_callback(runtime.stop)
            listener = InboxListener(settings.database_url, runtime.db, hub)
            parts.push_async_callback(listener.stop)
            await listener.start()
            hub.start()
            parts.push_async_callback(hub.stop)
            app.state.sweeper = LeaseSweeper.of_sender(
                runtime.db,
                settings,
                "sse",
                interval=settings.sse_sweep_seconds,
                # SSE rows hold no lease: they go from pending to sent in one
                # statement.
                grace_seconds=settings.sse_sweep_seconds,
            ).started_in(parts)
            yield

    app = GatewayApp(
        title="notiflow sse gateway",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),
        # No redirect from "/inbox/" to "/inbox": the router would build it from
        # the scope GatewayApp changed, whose query no longer holds the token, and
        # a redirect that kept it would write the token into one more URL. Such a
        # path is a 404, as any other path no route takes.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.hub = hub
    origins = settings.allowed_origins
    app.sse = StreamEndpoint(
        settings,
        hub,
        lambda: runtime.db,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        retry_ms=settings.sse_retry_ms,
        send_timeout=settings.sse_send_timeout,
        lean=settings.sse_lean,
        origins=frozenset(origins),
        max_streams=settings.sse_max_streams_per_user,
    )
    # Listed among the routes too, for tools that read them; GatewayApp answers
    # /sse before routing, so this route is not on the path of a request.
    app.router.add_route("/sse", app.sse, methods=["GET"], include_in_schema=False)
    if origins:
        app.cors = {
            "allow_origins": origins,
            "allow_methods": ["GET", "POST", "PATCH"],
            "allow_headers": ["Authorization", "Last-Event-ID", "Content-Type"],
        }
        app.add_middleware(Cors, **app.cors)
    # GatewayApp refuses a second token itself, ahead of the app, where it also
    # sees a query's; and /unsubscribe takes no bearer token, so ignores them.
    install_http_policy(
        app,
        settings.max_request_bytes,
        body_seconds=settings.http_body_timeout,
        one_authorization=False,
    )
    app.include_router(health_router(runtime))
    app.include_router(router)
    app.include_router(unsubscribe.router)
    web.mount(app)
    return app
