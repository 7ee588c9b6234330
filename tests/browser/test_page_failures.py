"""The demo page when something it depends on cannot be reached: it says so, and
gives the user back control, instead of waiting for ever.

A browser's push service cannot be reached from this machine at all, so
``PushManager.prototype.subscribe`` is replaced by a stand-in that never settles,
or settles only when the test says, and the VAPID key the page asks the push
sender for is answered by the test. The page's wait for the push service is
shortened through ``window.notiflow.pushSubscribeTimeoutMs``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.async_api import Browser, Page, Route, expect

from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

Site = tuple[Service, Demo]

SUBSCRIBE_TIMEOUT_MS = 500

# subscribe() hangs, as when the browser cannot reach its vendor's push service;
# window.__push.release() makes it succeed late.
STALLED_PUSH_MANAGER = """
(() => {
  const seen = { calls: 0, unsubscribed: 0, release: null };
  window.__push = seen;
  const subscription = {
    endpoint: "http://127.0.0.1:9/push/late",
    toJSON: () => ({ endpoint: "http://127.0.0.1:9/push/late", keys: {} }),
    unsubscribe: async () => { seen.unsubscribed++; return true; },
  };
  PushManager.prototype.subscribe = function () {
    seen.calls++;
    return new Promise((resolve) => { seen.release = () => resolve(subscription); });
  };
  PushManager.prototype.getSubscription = async () => null;
})();
"""
SHORT_WAIT = f"window.notiflow = {{ pushSubscribeTimeoutMs: {SUBSCRIBE_TIMEOUT_MS} }};"


def vapid_public_key() -> str:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


async def answer_vapid_key(route: Route) -> None:
    cors = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Headers": "Authorization",
    }
    if route.request.method == "OPTIONS":
        await route.fulfill(status=204, headers=cors)
        return
    await route.fulfill(
        status=200,
        headers=cors,
        content_type="application/json",
        body=json.dumps({"public_key": vapid_public_key()}),
    )


async def page_with_stalled_push(browser: Browser, gateway: Service) -> Page:
    context = await browser.new_context()
    await context.grant_permissions(["notifications"], origin=gateway.url)
    await context.add_init_script(SHORT_WAIT + STALLED_PUSH_MANAGER)
    page = await context.new_page()
    await page.route("**/push/vapid-public-key", answer_vapid_key)
    await page.goto(f"{gateway.url}/?user=bob")
    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#push-controls")).to_have_attribute("data-state", "off")
    return page


async def test_a_push_service_that_never_answers_gives_the_button_back(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    gateway, _ = site
    page = await page_with_stalled_push(browser, gateway)

    await page.click("#push-toggle")

    await expect(page.locator("#push-status")).to_have_text(
        "Could not enable notifications: the browser's push service did not "
        "answer in 0.5 s; check the connection and try again.",
        timeout=10_000,
    )
    await expect(page.locator("#push-controls")).to_have_attribute("data-state", "off")
    toggle = page.locator("#push-toggle")
    await expect(toggle).to_be_enabled()
    await expect(toggle).to_have_text("Enable notifications")
    await page.screenshot(path=str(tmp_path / "push-timeout.png"))


async def test_a_push_subscription_that_arrives_too_late_is_undone(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    page = await page_with_stalled_push(browser, gateway)
    await page.click("#push-toggle")
    await expect(page.locator("#push-status")).to_contain_text(
        "did not answer", timeout=10_000
    )

    await page.evaluate("window.__push.release()")

    await eventually(
        lambda: page.evaluate("window.__push.unsubscribed === 1"),
        timeout=10,
        what="late subscription undone",
    )
    await expect(page.locator("#push-controls")).to_have_attribute("data-state", "off")
    await expect(page.locator("#push-status")).to_contain_text("did not answer")


async def test_a_page_the_comments_api_refuses_says_where_it_looked(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    gateway, _ = site
    # The comments service accepts the gateway's 127.0.0.1 origin only.
    opened_at = f"http://localhost:{gateway.port}"
    api = gateway._env["NOTIFLOW_API_BASE_URL"]
    page = await (await browser.new_context()).new_page()
    refused: list[str] = []
    page.on(
        "requestfailed",
        lambda r: refused.append(r.url) if r.url.startswith(api) else None,
    )

    await page.goto(f"{opened_at}/")

    notice = page.locator("#notice")
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text(f"Could not reach the comments API at {api}")
    await expect(notice).to_contain_text(opened_at)
    await expect(notice).to_contain_text("NOTIFLOW_CORS_ORIGINS")
    await expect(notice).to_contain_text("NOTIFLOW_API_BASE_URL")
    await expect(page.locator("#post-title")).not_to_have_text("Loading…")
    assert refused, "the comments API was never asked"
    await page.screenshot(path=str(tmp_path / "api-refused.png"))

    # The form is the page's, not the browser's: submitting stays on the page.
    await page.fill("#comment-body", "anyone there?")
    await page.click("#comment-submit")
    await expect(page.locator("#form-error")).not_to_be_empty()
    assert page.url == f"{opened_at}/"
