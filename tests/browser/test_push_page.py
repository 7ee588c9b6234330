"""The push controls in headless Chromium: worker registration and button states.

Subscribing for real needs a push service this machine cannot reach, so the page's
``PushManager`` is replaced by a stand-in that hands out a subscription made here;
everything else is real: the service worker served at ``/sw.js``, the VAPID key
and the subscription API of a running push sender, CORS between the two origins.
A push is delivered to the worker through the DevTools protocol, as the browser's
own "Push" button in DevTools does.

The page is a minimal one carrying the markup the real page includes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from contracts.auth import issue_token
from contracts.settings import Settings
from push_sender.app import create_app as create_push_sender
from push_sender.settings import PushSettings
from sse_gateway import push_assets
from tests.support.data import Demo, seed_demo
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>notiflow</title></head>
<body><div id="push-controls"></div>
<script src="/static/push.js" defer></script></body></html>
"""

# Stands in for the browser's push service: subscribe() returns a subscription
# made by the test, and records what the page passed.
FAKE_PUSH_MANAGER = """
(() => {
  const made = %s;
  const seen = { subscribed: false, unsubscribed: 0, keyBytes: null };
  window.__push = seen;
  const subscription = {
    endpoint: made.endpoint,
    toJSON: () => made,
    unsubscribe: async () => {
      seen.subscribed = false;
      seen.unsubscribed++;
      return true;
    },
  };
  PushManager.prototype.subscribe = async function (options) {
    seen.keyBytes = new Uint8Array(options.applicationServerKey).length;
    seen.subscribed = true;
    return subscription;
  };
  PushManager.prototype.getSubscription = async function () {
    return seen.subscribed ? subscription : null;
  };
})();
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def made_subscription() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {
        "endpoint": f"http://127.0.0.1:9/push/{os.urandom(8).hex()}",
        "expirationTime": None,
        "keys": {"p256dh": b64url(point), "auth": b64url(os.urandom(16))},
    }


class Server:
    """An ASGI app served by uvicorn on 127.0.0.1 inside the test's event loop.

    The port is taken first, so that each origin is known before either app is
    built: the push sender's CORS setting names the page's.
    """

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._task: asyncio.Task[None] | None = None

    async def start(self, app: Any) -> None:
        config = uvicorn.Config(app, log_config=None, access_log=False, ws="none")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, timeout=15)
        self._socket.close()


@dataclass
class Site:
    page_url: str
    push_url: str
    token: str
    # Another user's, carol's.
    other_token: str


def page_app(push_url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/config.json")
    async def config() -> dict[str, str]:
        return {"push_base_url": push_url}

    app.include_router(push_assets.router)
    app.mount("/static", StaticFiles(directory=push_assets.SERVICE_WORKER.parent))
    return app


@pytest.fixture
async def site(settings: Settings) -> AsyncIterator[Site]:
    demo: Demo = await seed_demo(settings.database_url)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()

    page, push = Server(), Server()
    push_settings = PushSettings(
        **{
            **settings.model_dump(),
            "vapid_private_key": pem,
            "push_allowed_hosts": "127.0.0.1",
            "cors_origins": page.url,
        }
    )
    await push.start(create_push_sender(push_settings))
    await page.start(page_app(push.url))
    try:
        yield Site(
            page.url,
            push.url,
            issue_token(demo.bob, "bob", settings),
            issue_token(demo.carol, "carol", settings),
        )
    finally:
        await page.stop()
        await push.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(
    browser: Browser, site: Site, subscription: dict[str, Any]
) -> tuple[BrowserContext, Page]:
    context = await browser.new_context()
    await context.grant_permissions(["notifications"], origin=site.page_url)
    await context.add_init_script(
        f"localStorage.setItem('notiflow.token', {json.dumps(site.token)});"
        + FAKE_PUSH_MANAGER % json.dumps(subscription)
    )
    page = await context.new_page()
    page.set_default_timeout(10_000)
    await page.goto(site.page_url)
    return context, page


async def stored(site: Site, token: str | None = None) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=site.push_url) as client:
        resp = await client.get(
            "/push/subscriptions",
            headers={"Authorization": f"Bearer {token or site.token}"},
        )
    resp.raise_for_status()
    return resp.json()


async def state(page: Page, expected: str) -> str:
    await page.wait_for_selector(f'#push-controls[data-state="{expected}"]')
    return await page.inner_text("#push-toggle")


async def test_enable_registers_the_worker_and_stores_the_subscription(
    browser: Browser, site: Site
) -> None:
    subscription = made_subscription()
    context, page = await open_page(browser, site, subscription)

    assert await state(page, "off") == "Enable notifications"
    assert await page.evaluate("navigator.serviceWorker.getRegistration()") is None

    await page.click("#push-toggle")

    assert await state(page, "on") == "Disable notifications"
    worker = await page.evaluate(
        """navigator.serviceWorker.ready.then(r => ({
            scope: r.scope, script: r.active && r.active.scriptURL }))"""
    )
    assert worker == {"scope": f"{site.page_url}/", "script": f"{site.page_url}/sw.js"}
    assert await page.evaluate("window.__push.keyBytes") == 65
    assert [s["endpoint"] for s in await stored(site)] == [subscription["endpoint"]]

    await page.click("#push-toggle")

    assert await state(page, "off") == "Enable notifications"
    assert await page.evaluate("window.__push.unsubscribed") == 1
    assert await stored(site) == []
    await context.close()


async def signed_in(page: Page, token: str, previous: str) -> None:
    """What the page does once someone has signed in in place of ``previous``."""
    await page.evaluate(
        """([token, previous]) => {
            window.notiflow = { token };
            window.dispatchEvent(
                new CustomEvent("notiflow:signed-in", { detail: { previous } }));
        }""",
        [token, previous],
    )


async def pushed_to_bob(
    browser: Browser, site: Site, subscription: dict[str, Any]
) -> tuple[BrowserContext, Page]:
    """The page with push turned on for bob, the user signed in."""
    context, page = await open_page(browser, site, subscription)
    await state(page, "off")
    await page.click("#push-toggle")
    await state(page, "on")
    assert [s["endpoint"] for s in await stored(site)] == [subscription["endpoint"]]
    return context, page


async def test_another_user_signing_in_takes_push_off_the_user_before(
    browser: Browser, site: Site
) -> None:
    context, page = await pushed_to_bob(browser, site, made_subscription())

    await signed_in(page, site.other_token, previous=site.token)

    assert await state(page, "off") == "Enable notifications"
    assert "another user" in await page.inner_text("#push-status")
    assert await page.evaluate("window.__push.unsubscribed") == 1
    # Bob's notifications no longer go to the browser carol now uses.
    assert await stored(site) == []
    assert await stored(site, site.other_token) == []
    await context.close()


async def test_the_same_user_signing_in_again_keeps_push_on(
    browser: Browser, site: Site
) -> None:
    subscription = made_subscription()
    context, page = await pushed_to_bob(browser, site, subscription)

    await signed_in(page, site.token, previous=site.token)
    await page.evaluate("window.notiflowPush.refresh()")

    assert await state(page, "on") == "Disable notifications"
    assert await page.evaluate("window.__push.unsubscribed") == 0
    assert [s["endpoint"] for s in await stored(site)] == [subscription["endpoint"]]
    await context.close()


async def test_a_subscription_the_server_refuses_is_undone(
    browser: Browser, site: Site
) -> None:
    refused = {**made_subscription(), "endpoint": "http://push.example.net/x"}
    context, page = await open_page(browser, site, refused)
    await state(page, "off")

    await page.click("#push-toggle")

    assert await state(page, "off") == "Enable notifications"
    assert "endpoint" in await page.inner_text("#push-status")
    assert await page.evaluate("window.__push.unsubscribed") == 1
    assert await stored(site) == []
    await context.close()


async def test_the_worker_shows_a_push_and_tags_it_by_thread(
    browser: Browser, site: Site
) -> None:
    context, page = await open_page(browser, site, made_subscription())
    await state(page, "off")
    cdp = await context.new_cdp_session(page)
    registrations: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    cdp.on(
        "ServiceWorker.workerRegistrationUpdated",
        lambda event: registrations.extend(event["registrations"]),
    )
    cdp.on(
        "ServiceWorker.workerVersionUpdated",
        lambda event: versions.extend(event["versions"]),
    )
    await cdp.send("ServiceWorker.enable")
    await page.click("#push-toggle")
    await state(page, "on")
    # A registration is seen before its worker is activated, and a push delivered
    # to a registration with no activated worker is dropped.
    registration = await eventually(
        lambda: _activated(registrations, versions), what="worker activated"
    )

    payload = {
        "title": "Carol mentioned you",
        "body": "Have a look",
        "url": f"{site.page_url}/?post=42#comment-7",
        "notification_id": 7,
    }
    # Headless Chromium now and then drops a push that DevTools delivers to a
    # worker it has only just activated; the harness then delivers it again (one
    # thread's notifications share a tag, so a second copy replaces the first).
    shown: list[dict[str, Any]] = []
    for _ in range(3):
        await cdp.send(
            "ServiceWorker.deliverPushMessage",
            {
                "origin": site.page_url,
                "registrationId": registration["registrationId"],
                "data": json.dumps(payload),
            },
        )
        shown = await page.evaluate(
            """async () => {
                const r = await navigator.serviceWorker.ready;
                for (let i = 0; i < 60; i++) {
                    const found = await r.getNotifications();
                    if (found.length) return found.map(n => ({
                        title: n.title, body: n.body, tag: n.tag, data: n.data }));
                    await new Promise(done => setTimeout(done, 50));
                }
                return [];
            }"""
        )
        if shown:
            break
    assert shown == [
        {
            "title": "Carol mentioned you",
            "body": "Have a look",
            "tag": "notiflow-post-42",
            "data": {"url": payload["url"], "notification_id": 7},
        }
    ]
    await context.close()


async def _activated(
    registrations: list[dict[str, Any]], versions: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The live registration whose latest worker version is activated, if any."""
    latest = {r["registrationId"]: r for r in registrations}
    status = {v["registrationId"]: v["status"] for v in versions}
    return next(
        (
            r
            for r in latest.values()
            if not r["isDeleted"] and status.get(r["registrationId"]) == "activated"
        ),
        None,
    )
