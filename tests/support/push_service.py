"""A stand-in push service on 127.0.0.1, checking requests as a real one would.

Each device a test creates gets its own endpoint and its own browser key pair
(``p256dh``/``auth``), so the stand-in can do what only the browser could: decrypt
the aes128gcm body. Before answering it checks the VAPID token (an ES256 JWT
signed by the expected application server key, ``aud`` = this service's origin,
an ``exp`` within 24 hours, a ``sub``), and the ``TTL`` and ``Content-Encoding``
headers; a request that fails a check gets a 400/401/403 and lands in
``problems``. A device answers from its script of responses, then 201.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import http_ece
import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

MAX_BODY = 4096


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Answer:
    status: int = 201
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds the service takes to answer.
    delay: float = 0.0
    body: bytes = b""
    # Seconds the body stops for once it has begun, with more of it promised.
    stall: float = 0.0


@dataclass
class Received:
    at: float  # wall clock, to compare with timestamps from PostgreSQL
    headers: dict[str, str]
    size: int
    payload: dict[str, Any] | None
    status: int


@dataclass
class Device:
    """One browser's subscription, as ``PushSubscription.toJSON()`` would give it."""

    token: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    answers: list[Answer] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    @property
    def p256dh(self) -> str:
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url(point)

    def subscription(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)},
        }

    @property
    def delivered(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]


class PushService:
    def __init__(self, vapid_public_key: str) -> None:
        self.vapid_public_key = vapid_public_key
        self.devices: dict[str, Device] = {}
        self.problems: list[str] = []
        # Run once a push is taken, before it is answered: the world changing
        # while the sender waits for the answer.
        self.before_answer: Callable[[], Awaitable[object]] | None = None
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/push/{token}", self._push, methods=["POST"])])
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", ws="none"
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PushService:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=10)
        self._socket.close()

    def device(self, *answers: Answer) -> Device:
        token = uuid.uuid4().hex
        device = Device(
            token=token,
            endpoint=f"{self.origin}/push/{token}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth=os.urandom(16),
            answers=list(answers),
        )
        self.devices[token] = device
        return device

    async def _push(self, request: Request) -> Response:
        device = self.devices.get(request.path_params["token"])
        if device is None:
            return Response(status_code=404)
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}

        status, payload = self._check(headers, body, device)
        answer = Answer(status)
        if status == 201 and device.answers:
            answer = device.answers.pop(0)
        device.received.append(
            Received(time.time(), headers, len(body), payload, answer.status)
        )
        if self.before_answer is not None:
            await self.before_answer()
        await asyncio.sleep(answer.delay)
        if answer.stall:
            return StreamingResponse(
                _stalled(answer.body, answer.stall),
                status_code=answer.status,
                headers={**answer.headers, "Content-Length": str(len(answer.body) + 1)},
            )
        return Response(
            content=answer.body, status_code=answer.status, headers=answer.headers
        )

    def _check(
        self, headers: dict[str, str], body: bytes, device: Device
    ) -> tuple[int, dict[str, Any] | None]:
        problem = self._vapid_problem(headers.get("authorization", ""))
        if problem:
            self.problems.append(problem)
            return (403 if "signature" in problem else 401), None
        if headers.get("content-encoding") != "aes128gcm":
            self.problems.append(f"content-encoding {headers.get('content-encoding')}")
            return 400, None
        if not headers.get("ttl", "").isdigit():
            self.problems.append(f"TTL {headers.get('ttl')!r}")
            return 400, None
        if len(body) > MAX_BODY:
            return 413, None
        try:
            plain = http_ece.decrypt(
                body,
                private_key=device.private_key,
                auth_secret=device.auth,
                version="aes128gcm",
            )
            return 201, json.loads(plain)
        except Exception as exc:
            self.problems.append(f"cannot decrypt: {exc!r}")
            return 400, None

    def _vapid_problem(self, authorization: str) -> str | None:
        scheme, _, params = authorization.partition(" ")
        if scheme.lower() != "vapid":
            return f"authorization scheme {scheme!r}"
        fields = dict(
            part.strip().split("=", 1) for part in params.split(",") if "=" in part
        )
        if fields.get("k") != self.vapid_public_key:
            return f"vapid key {fields.get('k')!r} is not the expected one"
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), unb64url(self.vapid_public_key)
        )
        try:
            claims = jwt.decode(
                fields.get("t", ""),
                key,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["aud", "exp", "sub"]},
            )
        except jwt.InvalidSignatureError:
            return "bad vapid signature"
        except jwt.InvalidTokenError as exc:
            return f"bad vapid token: {exc}"
        if claims["exp"] > time.time() + 24 * 3600:
            return "vapid token valid for more than 24 hours"
        return None


async def _stalled(body: bytes, seconds: float) -> AsyncIterator[bytes]:
    """``body``, then nothing for ``seconds``, then the byte still owed."""
    yield body
    await asyncio.sleep(seconds)
    yield b"."
