"""An SMTP server that only notes when each notification's email arrived.

It keeps no message: a run at a few hundred emails a second would otherwise fill
memory or the disk. It serves from a thread and an event loop of its own, so it
competes with the load generator only for the GIL, and the arrival time is taken on
the same ``perf_counter`` clock as the send schedule.

It speaks just enough SMTP for a client that sends mail and nothing else: the
greeting, EHLO or HELO, MAIL, RCPT, DATA with dot-stuffed content, RSET, NOOP and
QUIT, each answered at once. It is small on purpose. The bench runs on the machine
it measures, and a full SMTP server (aiosmtpd, parsing each command in a coroutine of
its own) cost more CPU per email than the email sender that fed it.

It offers PIPELINING (RFC 2920), as Postfix and Exim do, so the email sender sends
MAIL, RCPT and DATA in one write as it would to a real relay; like Postfix, it
answers everything that arrived in one read with one write. ``pipelining=False``
makes it a server that does not offer the extension (it still reads whatever comes).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

# The email sender writes the notification id as a header and in the Message-ID.
_ID = re.compile(rb"X-Notiflow-Notification-Id:\s*(\d+)|<notification-(\d+)@", re.I)

# A line longer than this without an end is not SMTP; the connection is dropped.
_MAX_LINE = 64 * 1024
_END_OF_DATA = b"\r\n.\r\n"


class CountingSink:
    """Start with ``with CountingSink(port) as sink:``; read :attr:`arrivals`."""

    def __init__(self, port: int, pipelining: bool = True) -> None:
        self.port = port
        self.pipelining = pipelining
        # (notification id, perf_counter at the end of DATA); list.append is atomic
        # under the GIL, and the reader only takes slices of it.
        self.arrivals: list[tuple[int, float]] = []
        self.unparsed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def __enter__(self) -> CountingSink:
        self._thread = threading.Thread(target=self._serve, name="smtp sink")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the SMTP sink did not start on port {self.port}")
        if self._failure is not None:
            self._thread.join()
            raise RuntimeError(
                f"the SMTP sink could not listen on port {self.port}"
            ) from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                loop.create_server(
                    lambda: _Session(self), host="127.0.0.1", port=self.port
                )
            )
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    def _arrived(self, content: bytes) -> None:
        now = time.perf_counter()
        match = _ID.search(content)
        if match is None:
            self.unparsed += 1
        else:
            self.arrivals.append((int(match.group(1) or match.group(2)), now))


class _Session(asyncio.Protocol):
    """One client's conversation: commands, or content until its final dot."""

    def __init__(self, sink: CountingSink) -> None:
        self._sink = sink
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(b"220 127.0.0.1 bench sink ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        replies: list[bytes] = []
        closing = False
        while not closing:
            if self._in_data:
                # The content began after a line end, so its first line may be the
                # final dot itself: look for the end with that line end in front.
                end = (b"\r\n" + self._buffer).find(_END_OF_DATA)
                if end == -1:
                    break
                self._sink._arrived(bytes(self._buffer[:end]))
                del self._buffer[: end + 3]
                self._in_data = False
                replies.append(b"250 2.0.0 OK\r\n")
                continue
            end = self._buffer.find(b"\n")
            if end == -1:
                break
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            reply, closing = self._command(line)
            replies.append(reply)
        if len(self._buffer) > _MAX_LINE and not self._in_data:
            closing = True
            replies.append(b"500 5.5.2 line too long\r\n")
        if replies and self._transport is not None:
            self._transport.write(b"".join(replies))
        if closing and self._transport is not None:
            self._transport.close()

    def _command(self, line: bytes) -> tuple[bytes, bool]:
        """The reply to one command line, and whether to close afterwards."""
        verb = line[:4].upper()
        if verb == b"EHLO":
            extensions = [b"8BITMIME", b"SMTPUTF8", b"SIZE 52428800"]
            if self._sink.pipelining:
                extensions.insert(0, b"PIPELINING")
            lines = [b"250-127.0.0.1"] + [b"250-" + e for e in extensions[:-1]]
            return b"\r\n".join([*lines, b"250 " + extensions[-1]]) + b"\r\n", False
        if verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            return b"250 OK\r\n", False
        if verb == b"DATA":
            self._in_data = True
            return b"354 end data with <CR><LF>.<CR><LF>\r\n", False
        if verb == b"QUIT":
            return b"221 bye\r\n", True
        return b"502 5.5.1 command not implemented\r\n", False
