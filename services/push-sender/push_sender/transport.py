"""Connections to push services, made only to addresses the policy has checked.

A name that resolved to a public address when the browser subscribed may resolve
to 127.0.0.1 by the time a push goes out (DNS rebinding). So every new connection
resolves the host once more, refuses unless every address is global, and then
connects to one of exactly those addresses: no second look-up happens between the
check and the connect. The URL is left alone, so the ``Host`` header, TLS SNI and
certificate verification still use the name, and pooled connections are keyed by
it as before.

The seam is httpcore's network backend. httpx has no public way to hand its
transport one, so ``PinnedTransport`` replaces the pool that
``httpx.AsyncHTTPTransport`` built; ``test_transport`` fails if that stops taking
effect. Proxies from the environment are not used: a custom transport turns them
off in httpx, and a proxy would connect to a name we never checked.
"""

from __future__ import annotations

import typing

import httpcore
import httpx

from push_sender.endpoints import EndpointPolicy, Unresolvable

SocketOption = typing.Any


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks each host, then connects to a checked address."""

    def __init__(
        self,
        policy: EndpointPolicy,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host.lower() in self._policy.allowed_hosts:
            return await self._inner.connect_tcp(
                host, port, timeout, local_address, socket_options
            )
        # UnsafeAddress passes through httpx untouched and the caller refuses the
        # push; no address is a connect error like any other, so it is retried.
        try:
            addresses = await self._policy.addresses(host, port)
        except Unresolvable as exc:
            raise httpcore.ConnectError(str(exc)) from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"no address to connect to for {host}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("push services are not reached by unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# Connections open at once to push services, one per push in flight. The worker
# never has more pushes in flight than this (see PushWorker), so that no push waits
# for a connection inside the time it is given to be answered.
POOL_CONNECTIONS = 500


class PinnedTransport(httpx.AsyncHTTPTransport):
    def __init__(
        self,
        policy: EndpointPolicy,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError(
                "httpx.AsyncHTTPTransport no longer keeps its pool in _pool; "
                "the address check would be bypassed"
            )
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=POOL_CONNECTIONS,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(policy, inner),
        )
