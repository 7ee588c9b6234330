"""The pieces every service runs: a pool, a broker link, the relay, health routes.

A service builds a :class:`Runtime` in its FastAPI lifespan, registers its consumers
on ``runtime.broker`` before :meth:`Runtime.start`, and mounts :func:`health_router`.
Nothing here connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import aio_pika
import asyncpg
import uvicorn
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from faststream.rabbit import RabbitBroker
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.config import STARTUP_FAILURE

from contracts import logs, topology, tracing
from contracts.consumer import BatchHandler, Consumers, Handler, M, Publisher
from contracts.db import create_pool
from contracts.httpserver import headers_in_time
from contracts.messages import Envelope
from contracts.outbox import OutboxRelay
from contracts.preflight import missing_schema, require_services
from contracts.settings import (
    InvalidSetting,
    Settings,
    amqp_connection_name,
    amqp_options,
    get_settings,
    is_host,
    load_or_exit,
    redact_url,
)
from contracts.tasks import bounded, stop_task

logger = logging.getLogger(__name__)

# Seconds a connection to the broker may take to open, and the pause between
# attempts to reopen a lost one when the URL sets no reconnect_interval (the
# pause aio-pika takes too).
CONNECT_TIMEOUT = 10
RECONNECT_INTERVAL = 5.0
# How often a consumer the broker cancelled (its queue was deleted) is looked for,
# to declare the topology again and consume once more.
RESUME_SECONDS = 2.0
# Every this many passes of the consumer keeper, each queue is looked at for a
# consumer that takes nothing while messages wait: a stall shows in two looks.
STALL_LOOK_PASSES = 3
# The most a look at a queue's waiting messages may take (a connection being
# restored holds it up).
READY_LOOK_SECONDS = 5.0
# How long a stopping runtime waits for that loop to end once cancelled.
KEEPER_STOP_SECONDS = 3.0


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        relay: bool = False,
        consumers: bool = False,
        pool_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.relay: OutboxRelay | None = None
        self._want_relay = relay
        self._pool_options = pool_options or {}
        self.broker: RabbitBroker | None = None
        self.consumers: Consumers | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replacing = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        if consumers:
            # FastStream hands aio-pika a reconnect interval and a fail_fast of
            # its own, which win over the URL's, so it gets the URL's interval;
            # the settings refuse a fail_fast, and any option that would reach
            # aio-pika twice, in the URL. Its client_properties become options
            # of the URL it rebuilds, so the connection's name goes as the
            # option aiormq reads it from, name.
            interval = amqp_options(settings.amqp_url).get("reconnect_interval")
            name = amqp_connection_name(settings.amqp_url, "consumers")
            link = logs.BrokerLink(name)
            self.broker = RabbitBroker(
                settings.amqp_url,
                timeout=CONNECT_TIMEOUT,
                reconnect_interval=float(interval or RECONNECT_INTERVAL),
                client_properties={"name": name},
                on_close=[link.lost],
                on_reconnected=[link.restored],
                logger=None,
                graceful_timeout=settings.drain_seconds,
                apply_types=False,
            )
            self.consumers = Consumers(self.broker, self.publisher)

    def publisher(self) -> Publisher:
        if self._channel is None:
            raise RuntimeError("runtime is not started")
        return Publisher(self._channel, self._declare, self._channel_instead_of)

    async def _channel_instead_of(self, lost: AbstractChannel) -> AbstractChannel:
        """A new channel for publishing, if ``lost`` is still the one in use: the
        broker closed it and aio-pika could not open it again."""
        async with self._replacing:
            if self._channel is lost and self._connection is not None:
                # Closed for good, so that nothing reopens it beside the new one.
                await bounded(lost.close(), "closing the lost publishing channel")
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                await self._declare()
                logger.info(
                    "the broker had closed the channel for retries and dead "
                    "letters; they are published on a new one",
                    extra={"action": "publisher.channel_replaced"},
                )
            if self._channel is None:
                raise RuntimeError("runtime is not started")
            return self._channel

    async def _declare(self) -> None:
        if self._channel is None:
            raise RuntimeError("runtime is not started")
        await topology.declare(self._channel, self.settings.retry_delay_levels)

    def subscribe(
        self,
        queue: str,
        model: type[M],
        handler: Handler[M],
        *,
        prefetch: int,
        action: str,
        envelope: type[Envelope[M]] | None = None,
    ) -> None:
        """Consume ``queue`` with the policy of :mod:`contracts.consumer`."""
        if self.consumers is None:
            raise RuntimeError("this runtime was built without consumers")
        self.consumers.subscribe(
            queue, model, handler, prefetch=prefetch, action=action, envelope=envelope
        )

    def subscribe_batch(
        self,
        queue: str,
        model: type[M],
        handler: BatchHandler[M],
        *,
        prefetch: int,
        max_batch: int,
        workers: int = 2,
        max_items: int | None = None,
        slow_after: float | None = None,
        action: str,
        envelope: type[Envelope[M]] | None = None,
    ) -> None:
        """Consume ``queue`` in batches, see :meth:`Consumers.subscribe_batch`."""
        if self.consumers is None:
            raise RuntimeError("this runtime was built without consumers")
        self.consumers.subscribe_batch(
            queue,
            model,
            handler,
            prefetch=prefetch,
            max_batch=max_batch,
            workers=workers,
            max_items=max_items,
            slow_after=slow_after,
            action=action,
            envelope=envelope,
        )

    @property
    def db(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("runtime is not started")
        return self.pool

    async def start(self) -> None:
        """Connect, declare the topology, start the relay and the consumers.

        A start that fails part way closes what it had opened: a broker connection
        left behind would go on trying to reconnect for as long as the process lives.
        """
        try:
            await self._start()
        except BaseException as failed:
            try:
                await self._close_links()
            except Exception as exc:
                # What stopped the start is what the caller learns.
                logger.warning(
                    "could not close everything after a failed start (%r): %r",
                    failed,
                    exc,
                    extra={"action": "runtime.close_failed"},
                )
            raise

    async def _start(self) -> None:
        self.pool = await create_pool(self.settings, **self._pool_options)
        name = amqp_connection_name(self.settings.amqp_url)
        self._connection = await aio_pika.connect_robust(
            self.settings.amqp_url,
            timeout=CONNECT_TIMEOUT,
            client_properties={"connection_name": name},
        )
        logs.BrokerLink(name).watch(self._connection)
        # A message no queue takes is refused, not confirmed: see Publisher.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._declare()
        if self._want_relay:
            self.relay = OutboxRelay(
                self.pool, self.settings, connection=self._connection
            )
            await self.relay.start()
        if self.broker is not None:
            await self.broker.start()
        if self.consumers is not None:
            self._keeper = asyncio.create_task(
                self._keep_consuming(self.consumers), name="keep-consuming"
            )

    async def _keep_consuming(self, consumers: Consumers) -> None:
        """Declare a deleted queue again and consume from it once more.

        Every service declares the whole topology at start; a queue deleted while it
        runs (by hand, or lost with a broker node) would otherwise stay gone, and
        unconsumed, until some service restarts or publishes to it (a message no
        queue takes is refused, and its publisher declares the topology again).
        """
        passes = 0
        while True:
            await asyncio.sleep(RESUME_SECONDS)
            passes += 1
            try:
                cancelled = await consumers.cancelled()
                if cancelled:
                    await self._declare()
                    await consumers.resume(cancelled)
                if passes % STALL_LOOK_PASSES == 0:
                    await self._restart_stalled(consumers)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "could not look after the consumers (a deleted queue, a "
                    "stalled consumer): %r",
                    exc,
                    extra={"action": "consumer.resume_failed"},
                )

    async def _restart_stalled(self, consumers: Consumers) -> None:
        """Consume anew from each queue whose consumer takes nothing while
        messages wait (see :meth:`Consumers.stalled`)."""
        stalled = await consumers.stalled(self._ready_in)
        for queue, waiting in stalled.items():
            logger.warning(
                "the consumer of %s took nothing for %gs or more while its queue "
                "held messages (%d messages waiting); consuming again on a new "
                "channel",
                queue,
                2 * RESUME_SECONDS * STALL_LOOK_PASSES,
                waiting,
                extra={"action": "consumer.restarted", "queue": queue},
            )
            await consumers.restart(queue)

    async def _ready_in(self, queue: str) -> int | None:
        """How many messages ``queue`` holds ready to be handed out; None when
        it cannot be told (the queue is gone, say)."""
        connection = self._connection
        if (
            connection is None
            or connection.is_closed
            or not connection.connected.is_set()
        ):
            return None
        async with asyncio.timeout(READY_LOOK_SECONDS):
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                return declared.declaration_result.message_count
            except aio_pika.exceptions.ChannelClosed:
                return None
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def stop(self) -> None:
        """Stop taking messages, let in-flight ones finish, then close everything.

        See :meth:`contracts.consumer.Consumers.stop` for what becomes of the
        messages this process holds. The connections and the pool are closed even
        when the steps before fail or the stop is cancelled.
        """
        await stop_in_order(self._stop_consuming, self._close_links)

    async def _stop_consuming(self) -> None:
        if self._keeper is not None:
            await stop_task(
                self._keeper,
                "the consumer keeper",
                timeout=RESUME_SECONDS + KEEPER_STOP_SECONDS,
            )
        if self.consumers is not None:
            await self.consumers.stop(self.settings.drain_seconds)

    async def _close_links(self) -> None:
        """Close the broker connections and the pool, each whatever the others do."""
        steps: list[Callable[[], Awaitable[object]]] = []
        if (broker := self.broker) is not None:
            # Nothing left in hand by now: this only closes the consumers' connection.
            steps.append(
                lambda: bounded(broker.stop(), "closing the consumers' connection")
            )
        if (relay := self.relay) is not None:
            steps.append(relay.stop)
        if (connection := self._connection) is not None:
            steps.append(
                lambda: bounded(connection.close(), "closing the broker connection")
            )
        if (pool := self.pool) is not None:
            steps.append(lambda: _close_pool(pool))
        await stop_in_order(*steps)

    async def _database_problem(self) -> str | None:
        """Why the database cannot serve this service, or None.

        Not only reachable: a schema rolled back or dropped under running
        services fails every request, and traffic should go elsewhere. A pool
        whose every connection is in use says nothing of the database: the
        question goes over a connection of its own then, so that load, which
        every replica shares, does not take them all out of service at once.
        """
        where = redact_url(self.settings.database_url)
        try:
            conn = await self.db.acquire(timeout=1)
        except TimeoutError:
            try:
                alone = await asyncpg.connect(self.settings.database_url, timeout=1)
            except Exception as exc:
                return repr(exc)
            try:
                return await _schema_problem(alone, where)
            finally:
                await alone.close(timeout=1)
        except Exception as exc:
            return repr(exc)
        try:
            return await _schema_problem(conn, where)
        finally:
            await self.db.release(conn)

    async def readiness(self) -> dict[str, str]:
        """Each dependency and whether it answers; empty values mean all is well."""
        problems: dict[str, str] = {}
        if (database := await self._database_problem()) is not None:
            problems["database"] = database
        # A robust connection that lost the broker is not closed: it is waiting
        # to reconnect, and only its ``connected`` event says so.
        links = [self._connection]
        if self.relay is not None:
            links.append(self.relay.connection)
        if any(
            link is None or link.is_closed or not link.connected.is_set()
            for link in links
        ):
            problems["broker"] = "broker connection is down"
        if self.broker is not None:
            try:
                alive = await self.broker.ping(timeout=1)
            except Exception as exc:
                alive, problems["consumers"] = False, repr(exc)
            if not alive:
                problems.setdefault("consumers", "broker connection is down")
        if self.consumers is not None and "consumers" not in problems:
            missing = await self.consumers.missing()
            if missing:
                problems["consumers"] = f"not consuming {', '.join(missing)}"
        return problems


async def _schema_problem(conn: asyncpg.Connection, where: str) -> str | None:
    try:
        return await missing_schema(conn, where, quiet=True, timeout=1)
    except Exception as exc:
        return repr(exc)


async def stop_in_order(*steps: Callable[[], Awaitable[object]]) -> None:
    """Await each step in turn, every one of them even when a step before it
    raised or was cancelled; then raise what went wrong, if anything did.

    A service's stop is such a list: sweepers, consumers, broker connections, the
    pool. One that fails must not leave the others open, least of all a broker
    connection, which would go on reconnecting for as long as the process lives.
    """
    async with contextlib.AsyncExitStack() as stack:
        for step in reversed(steps):
            stack.push_async_callback(step)


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=5)
    except TimeoutError:
        pool.terminate()


def health_router(runtime: Runtime) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = await runtime.readiness()
        if problems:
            return JSONResponse({"status": "unavailable", **problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def serve(make_app: Callable[[], Any], service: str, default_port: int) -> None:
    """A service's entrypoint: start-up checks, JSON logs, then uvicorn."""
    settings = load_or_exit(get_settings)
    host = load_or_exit(lambda: listen_host(os.environ.get("HOST")))
    port = load_or_exit(lambda: listen_port(os.environ.get("PORT"), default_port))
    # Before the app is built: the broker connections it sets up carry the name.
    logs.configure(service, settings.log_level)
    # Building the app checks the service's own settings and files; it connects
    # to nothing, so a mistake in them is reported whatever the address.
    app = load_or_exit(make_app)
    # Uvicorn would bind only once the app has started (database, broker,
    # consumers): the address is taken here, before any of that, so that one
    # the service cannot use stops it first. Until uvicorn serves, a client's
    # connection waits in the backlog instead of being refused.
    sockets = load_or_exit(lambda: listen(host, port))
    tracing.configure(service)
    require_services(settings, migrated=True)
    logger.info(
        "%s listening on http://%s:%d",
        service,
        f"[{host}]" if ":" in host else host,
        sockets[0].getsockname()[1],
        extra={"action": "service.started"},
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            backlog=BACKLOG,
            http=headers_in_time(settings.http_headers_timeout),
            timeout_graceful_shutdown=int(settings.drain_seconds) + 1,
            lifespan="on",
        )
    )
    _stop_on_hangup(server, service)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        # Once drained, uvicorn raises again the SIGINT it caught, which Python
        # turns into this; the service has stopped as asked.
        pass
    sys.exit(0 if server.started else STARTUP_FAILURE)


def _stop_on_hangup(server: uvicorn.Server, service: str) -> None:
    """Stop on SIGHUP as on SIGTERM, draining first.

    A hang-up (the terminal the service runs in closing) would otherwise end the
    process at once, messages and emails in hand. No setting is read again on
    it: the dispatcher takes up edits of its files by itself.
    """

    def hung_up(signum: int, frame: FrameType | None) -> None:
        logger.info(
            "%s got SIGHUP; stopping as for SIGTERM",
            service,
            extra={"action": "service.hangup"},
        )
        server.handle_exit(signal.SIGTERM, frame)

    signal.signal(signal.SIGHUP, hung_up)


# Connections the kernel holds for the service before it accepts them, as
# many as uvicorn would ask for.
BACKLOG = 2048


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening at ``port`` on every address ``host`` stands for, as
    uvicorn would open them (IPv6 ones for IPv6 only).

    InvalidSetting naming ``HOST`` or ``PORT`` if the address cannot be used: a
    name that does not resolve, an address this machine does not have, a port
    in use.
    """
    try:
        found = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        # Only a scoped IPv6 address, of all that listen_host takes, has a %.
        zone = host.partition("%")[2]
        if zone:
            problem = f"{host} names {zone}, no network interface of this machine"
        else:
            problem = f"{host} does not resolve to an address: {exc.strerror}"
        raise InvalidSetting("HOST", problem) from None
    sockets: list[socket.socket] = []
    refused: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            where = host if address[0] == host else f"{host} ({address[0]})"
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                # An address family this machine lacks (IPv6 turned off): a
                # name may still stand for addresses of the other.
                refused = refused or exc
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                sock.listen(BACKLOG)
            except OSError as exc:
                raise _unusable(where, port, exc) from None
        if not sockets:
            raise InvalidSetting(
                "HOST", f"{host} cannot be listened on: {_reason(refused)}"
            )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _unusable(where: str, port: int, exc: OSError) -> InvalidSetting:
    if exc.errno == errno.EADDRINUSE:
        return InvalidSetting("PORT", f"{port} on {where} is already in use")
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidSetting("HOST", f"{where} is not an address of this machine")
    if exc.errno == errno.EACCES:
        return InvalidSetting(
            "PORT", f"{port} on {where} is a port this process may not listen on"
        )
    return InvalidSetting(
        "HOST", f"cannot listen on {where} port {port}: {_reason(exc)}"
    )


def _reason(exc: OSError | None) -> str:
    if exc is None:
        return "it stands for no address"
    return exc.strerror or str(exc)


DEFAULT_HOST = "127.0.0.1"
_HOST = "an IP address or a host name (letters, digits, hyphens and dots)"


def listen_host(value: str | None) -> str:
    """``HOST``, the address a service listens on: an IP address or a host name,
    read by its syntax alone (:func:`listen` resolves the name).

    InvalidSetting naming ``HOST`` if it can be neither.
    """
    if value is None:
        return DEFAULT_HOST
    shown = repr(value if len(value) <= 60 else f"{value[:60]}...")
    if value == "":
        raise InvalidSetting(
            "HOST", f"is empty; give {_HOST}, or unset it for {DEFAULT_HOST}"
        )
    if value.startswith("[") and value.endswith("]"):
        raise InvalidSetting(
            "HOST", f"must be {_HOST}; write an IPv6 address without [ ], got {shown}"
        )
    if not is_host(value):
        raise InvalidSetting("HOST", f"must be {_HOST}, got {shown}")
    return value


def listen_port(value: str | None, default: int) -> int:
    """``PORT`` as a TCP port, ``default`` when unset; else InvalidSetting."""
    if value is None:
        return default
    if value == "":
        raise InvalidSetting(
            "PORT",
            f"is empty; give a TCP port from 1 to 65535, or unset it for {default}",
        )
    # isdigit alone takes characters such as "²" that int() refuses.
    if value.isascii() and value.isdigit() and 1 <= int(value) <= 65535:
        return int(value)
    raise InvalidSetting("PORT", f"must be a TCP port from 1 to 65535, got {value!r}")
