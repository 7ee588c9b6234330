"""Wires the push sender: VAPID keys, delivery consumer, lease sweeper, HTTP API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from contracts import topology, tracing
from contracts.db import GENERIC_PLANS
from contracts.http import Cors, install_http_policy
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.recovery import LeaseSweeper
from contracts.runtime import Runtime, health_router
from push_sender import vapid
from push_sender.api import name_every_problem, router
from push_sender.endpoints import EndpointPolicy, Resolve, system_resolve
from push_sender.settings import PushSettings
from push_sender.transport import PinnedTransport
from push_sender.worker import PushWorker


def create_app(
    settings: PushSettings | None = None, resolve: Resolve = system_resolve
) -> FastAPI:
    """The service; ``resolve`` is replaced only by tests that play DNS."""
    settings = settings or PushSettings()
    keys = vapid.load(settings)
    policy = EndpointPolicy(
        settings.allowed_hosts,
        settings.allow_plain_http,
        resolve,
        settings.push_resolve_timeout,
    )
    # The relay publishes what the lease sweeper re-enqueues.
    runtime = Runtime(
        settings,
        relay=True,
        consumers=True,
        pool_options={"server_settings": GENERIC_PLANS},
    )
    client: httpx.AsyncClient | None = None

    def http() -> httpx.AsyncClient:
        if client is None:
            raise RuntimeError("the push sender is not started")
        return client

    worker = PushWorker(
        lambda: runtime.db,
        http,
        keys,
        ttl=settings.push_ttl_seconds,
        timeout=settings.push_timeout,
        retry_delays=settings.retry_delay_levels,
        lease_seconds=settings.push_lease_seconds,
        endpoints=policy,
        max_subscriptions=settings.push_max_subscriptions_per_user,
        stopping=lambda: runtime.consumers is not None and runtime.consumers.stopping,
    )
    runtime.subscribe(
        topology.delivery_queue("push"),
        DeliveryRequested,
        worker,
        prefetch=settings.push_prefetch,
        action="push",
        envelope=DeliveryBatch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal client
        # Redirects are not followed: the endpoint was checked, its target was not.
        # The transport connects only to addresses the policy has just checked.
        # Answers are asked for uncompressed, and read only in part (webpush).
        client = httpx.AsyncClient(
            transport=PinnedTransport(policy),
            timeout=httpx.Timeout(settings.push_timeout),
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
        )
        # Each part is stopped, last started first, whatever the others do.
        async with contextlib.AsyncExitStack() as parts:
            parts.push_async_callback(client.aclose)
            await runtime.start()
            parts.push_async_callback(runtime.stop)
            LeaseSweeper.of_sender(
                runtime.db,
                settings,
                "push",
                interval=settings.push_sweep_seconds,
                grace_seconds=settings.push_lease_seconds,
            ).started_in(parts)
            yield

    app = FastAPI(
        title="notiflow push sender",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),
    )
    app.state.runtime = runtime
    app.state.vapid = keys
    app.state.endpoints = policy
    app.state.max_subscriptions = settings.push_max_subscriptions_per_user
    origins = settings.allowed_origins
    if origins:
        app.add_middleware(
            Cors,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    install_http_policy(
        app, settings.max_request_bytes, body_seconds=settings.http_body_timeout
    )
    name_every_problem(app)
    app.include_router(health_router(runtime))
    app.include_router(router)
    return app
