"""A small Server-Sent Events client for tests, on httpx."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSEClient:
    """Reads a stream in the background; ``events`` and ``comments`` fill up.

    ``ended`` is set when the server ends the stream (or refuses it); leaving the
    ``async with`` block drops the connection, the way a closed tab does.
    """

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    status: int | None = None
    response_headers: httpx.Headers | None = None
    body: bytes = b""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> SSEClient:
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._connected.wait(), timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        try:
            await self._stream()
        finally:
            self.ended.set()
            self._connected.set()

    async def _stream(self) -> None:
        timeout = httpx.Timeout(10, read=None)
        async with httpx.AsyncClient(timeout=timeout) as client:
            async with client.stream("GET", self.url, headers=self.headers) as resp:
                self.status = resp.status_code
                self.response_headers = resp.headers
                if resp.status_code != 200:
                    self.body = await resp.aread()
                    return
                current = Event()
                async for line in resp.aiter_lines():
                    if line.startswith(":"):
                        self.comments.append(line[1:].strip())
                        if line[1:].strip() == "connected":
                            self._connected.set()
                    elif line == "":
                        if current.data or current.id or current.event != "message":
                            self.events.append(current)
                        current = Event()
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "data":
                            current.data += ("\n" if current.data else "") + value
                        elif name == "event":
                            current.event = value
                        elif name == "id":
                            current.id = value
                        elif name == "retry":
                            self.retry = int(value)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.event == kind]

    def ids(self, kind: str = "notification") -> list[int]:
        return [int(e.id) for e in self.of(kind) if e.id is not None]

    async def wait_for(
        self, kind: str, count: int = 1, timeout: float = 15.0
    ) -> list[Event]:
        async def enough() -> None:
            while len(self.of(kind)) < count:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(enough(), timeout)
        return self.of(kind)

    async def wait_comment(self, text: str, timeout: float = 15.0) -> None:
        async def seen() -> None:
            while text not in self.comments:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(seen(), timeout)
