"""A TCP proxy the test can cut, to take PostgreSQL away from one service only."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.processes import free_port


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        # Cleared while new connections are held (see stall).
        self._passing = asyncio.Event()
        self._passing.set()
        # Cleared while nothing goes through (see hang).
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._passing.set()
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port
            )

    def hang(self) -> None:
        """Keep every connection open, and pass nothing more either way: a server
        that stopped answering, or a network that lost its packets."""
        self._flowing.clear()

    def stall(self) -> None:
        """Keep the open connections, but hold new ones: accepted, never passed on."""
        self._passing.clear()

    async def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        server, self._server = self._server, None
        # Held connections go on to find the proxy cut.
        self._passing.set()
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if server is not None:
            # Since 3.11.x this also waits for the handlers of open connections.
            await asyncio.wait_for(server.wait_closed(), 5)

    async def close(self) -> None:
        await self.cut()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self._passing.is_set():
            self._writers.add(writer)
            try:
                await self._passing.wait()
            finally:
                self._writers.discard(writer)
        if self._server is None:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:
            # Cut while this connection was being opened: it must not outlive the cut.
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
