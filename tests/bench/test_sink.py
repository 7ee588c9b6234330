"""The bench's SMTP sink counts what the email sender's pool sends, pipelined or not."""

from __future__ import annotations

import aiosmtplib
import pytest

from bench.sink import CountingSink
from email_sender.mime import build
from email_sender.smtp import SmtpConfig, SmtpPool
from tests.support.processes import free_port


@pytest.mark.parametrize("pipelining", [True, False])
async def test_every_email_the_pool_sends_is_counted(pipelining: bool) -> None:
    port = free_port()
    with CountingSink(port, pipelining=pipelining) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=2)
        async with client:
            offered = client.supports_extension("pipelining")

        pool = SmtpPool(SmtpConfig("127.0.0.1", port, timeout=2), size=3)
        try:
            for n in range(10):
                await pool.send(
                    build(
                        notification_id=n,
                        to_address=f"user{n}@example.com",
                        to_name="User",
                        subject="note",
                        text="hello",
                        html=None,
                        sender="n@example.com",
                        sender_name="notiflow",
                        domain="example.com",
                    )
                )
        finally:
            await pool.close()

    assert offered is pipelining
    assert sorted(n for n, _ in sink.arrivals) == list(range(10))
    assert sink.unparsed == 0
