"""Connections go only to addresses just checked, never to a second look-up."""

from __future__ import annotations

import typing

import httpcore
import httpx
import pytest

from push_sender.endpoints import EndpointPolicy, UnsafeAddress
from push_sender.transport import GuardedBackend, PinnedTransport


class Records:
    """A resolver whose answers the test sets; it counts how often it is asked."""

    def __init__(self, **records: list[str]) -> None:
        self.records = {k.replace("_", "."): v for k, v in records.items()}
        self.asked = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked += 1
        return self.records[host]


class Refusing(httpcore.AsyncNetworkBackend):
    """Records where it was asked to connect, and connects nowhere."""

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.dialled: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.dialled.append((host, port))
        if host in self.refuse:
            raise httpcore.ConnectError(f"{host} refused")
        return httpcore.AsyncMockStream([])


def policy(resolve: Records, allowed: frozenset[str] = frozenset()) -> EndpointPolicy:
    return EndpointPolicy(allowed, False, resolve, 1.0)


async def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    inner = Refusing(refuse=frozenset({"93.184.216.34"}))
    dns = Records(push_example_net=["93.184.216.34", "2606:2800:220:1::1"])
    backend = GuardedBackend(policy(dns), inner)

    await backend.connect_tcp("push.example.net", 443)

    assert inner.dialled == [("93.184.216.34", 443), ("2606:2800:220:1::1", 443)]
    assert dns.asked == 1


async def test_a_name_that_now_resolves_inside_is_never_dialled() -> None:
    inner = Refusing()
    dns = Records(push_example_net=["93.184.216.34", "127.0.0.1"])
    backend = GuardedBackend(policy(dns), inner)

    with pytest.raises(UnsafeAddress, match=r"127\.0\.0\.1"):
        await backend.connect_tcp("push.example.net", 443)
    assert inner.dialled == []


async def test_a_name_without_address_is_a_connect_error_to_retry() -> None:
    backend = GuardedBackend(policy(Records(push_example_net=[])), Refusing())

    with pytest.raises(httpcore.ConnectError, match="no address"):
        await backend.connect_tcp("push.example.net", 443)


async def test_an_allow_listed_host_is_dialled_by_name_unchecked() -> None:
    inner = Refusing()
    dns = Records()
    backend = GuardedBackend(policy(dns, frozenset({"127.0.0.1"})), inner)

    await backend.connect_tcp("127.0.0.1", 8999)

    assert inner.dialled == [("127.0.0.1", 8999)] and dns.asked == 0


async def test_the_client_refuses_through_the_pinned_transport() -> None:
    inner = Refusing()
    dns = Records(push_example_net=["10.0.0.7"])
    transport = PinnedTransport(policy(dns), inner)

    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(UnsafeAddress, match=r"10\.0\.0\.7"):
            await client.post("https://push.example.net/x", content=b"")

    assert dns.asked == 1 and inner.dialled == []
