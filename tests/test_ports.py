"""The ports the tests hand to the services they start."""

from __future__ import annotations

import socket

from tests.support.processes import _ephemeral_range, free_port, has_ipv6_loopback


def test_a_port_for_a_service_is_one_no_outgoing_connection_can_take() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert not [port for port in ports if low <= port <= high]


def test_no_port_is_handed_out_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_a_port_handed_out_can_be_listened_on() -> None:
    hosts = [("127.0.0.1", socket.AF_INET)]
    if has_ipv6_loopback():
        hosts.append(("::1", socket.AF_INET6))
    for host, family in hosts:
        port = free_port(host)
        with socket.socket(family) as server:
            server.bind((host, port))
            server.listen()
            with socket.create_connection((host, port), timeout=2):
                pass
