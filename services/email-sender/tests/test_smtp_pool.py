"""Kept SMTP connections, against a real SMTP server."""

from __future__ import annotations

import pytest

from email_sender.mime import build
from email_sender.smtp import SmtpConfig, SmtpPool, TransientSendError
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually


def message(n: int):
    return build(
        notification_id=n,
        to_address=f"user{n}@example.com",
        to_name="User",
        subject=f"note {n}",
        text="hello",
        html=None,
        sender="n@example.com",
        sender_name="notiflow",
        domain="example.com",
    )


@pytest.fixture
def server():
    with SmtpServer() as smtp:
        yield smtp


def pool(server: SmtpServer, size: int = 2) -> SmtpPool:
    return SmtpPool(SmtpConfig("127.0.0.1", server.port, timeout=2), size=size)


async def test_messages_in_a_row_share_one_connection(server: SmtpServer) -> None:
    transport = pool(server)
    try:
        for n in range(5):
            await transport.send(message(n))
    finally:
        await transport.close()

    assert len(server.received) == 5
    assert server.connections == 1


async def test_a_connection_closed_by_the_server_is_replaced(
    server: SmtpServer,
) -> None:
    transport = pool(server)
    try:
        await transport.send(message(1))
        server.close_connections()
        await eventually(lambda: _closed(server), what="server closed the connection")

        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == [
        "<notification-1@example.com>",
        "<notification-2@example.com>",
    ]
    assert server.connections == 2


async def test_a_failed_message_does_not_leave_its_connection_behind(
    server: SmtpServer,
) -> None:
    server.then("tempfail")
    transport = pool(server)
    try:
        with pytest.raises(TransientSendError, match="451"):
            await transport.send(message(1))
        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == ["<notification-2@example.com>"]
    assert server.connections == 2


async def _closed(server: SmtpServer) -> bool:
    return not server.open
