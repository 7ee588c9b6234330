"""A scripted HTTP/1.1 server on 127.0.0.1 for the bench's client tests.

It reads each request (head, and a body of Content-Length bytes), hands it to the
test's ``answer``, and counts the connections it was given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Answer = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]


class Server:
    """An HTTP server whose ``answer`` writes each reply and says whether to go on."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers)
        await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if not await self._answer(head, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Only __aexit__ cancels, to end the test. Ending quietly keeps Python
            # 3.11's start_server from logging the cancelled handler as an error.
            pass
        finally:
            self.open_now -= 1
            writer.close()


def created(body: bytes = b'{"id":7}') -> Answer:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        await writer.drain()
        return True

    return answer
