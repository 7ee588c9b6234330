"""The bench's SMTP sink counts what the email sender's pool sends, pipelined or not."""

from __future__ import annotations

import asyncio

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


async def _read_replies(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """``count`` final reply lines (a multi-line reply counts once)."""
    replies: list[bytes] = []
    while len(replies) < count:
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line, f"connection closed after {replies!r}"
        if line[3:4] != b"-":
            replies.append(line)
    return replies


async def test_content_split_across_writes_is_counted_once_at_its_final_dot() -> None:
    port = free_port()
    with CountingSink(port) as sink:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await _read_replies(reader, 1))[0].startswith(b"220")
            writer.write(b"EHLO client\r\n")
            assert (await _read_replies(reader, 1))[0].startswith(b"250 ")

            writer.write(
                b"MAIL FROM:<n@example.com>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
            )
            codes = [r[:3] for r in await _read_replies(reader, 3)]
            assert codes == [b"250", b"250", b"354"]

            # The content comes in pieces: a dot-stuffed line, then the final dot
            # split across two writes.
            writer.write(b"Message-ID: <notification-41@example.com>\r\n\r\n..x\r\n")
            await writer.drain()
            writer.write(b"end\r\n.")
            await writer.drain()
            writer.write(b"\r\nQUIT\r\n")
            codes = [r[:3] for r in await _read_replies(reader, 2)]
            assert codes == [b"250", b"221"]
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()

    assert [n for n, _ in sink.arrivals] == [41]
    assert sink.unparsed == 0


async def test_an_email_without_a_notification_id_is_counted_as_unparsed() -> None:
    port = free_port()
    with CountingSink(port) as sink:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=2) as c:
            await c.sendmail(
                "n@example.com", ["a@example.com"], b"Subject: hi\r\n\r\n."
            )

    assert sink.arrivals == []
    assert sink.unparsed == 1


def test_a_port_in_use_is_refused_naming_the_port() -> None:
    port = free_port()
    with CountingSink(port), pytest.raises(RuntimeError, match=str(port)):
        with CountingSink(port):
            pass
