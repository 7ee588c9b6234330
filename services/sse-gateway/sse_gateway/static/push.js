// "Enable notifications" / "Disable notifications" for Web Push.
//
// The page includes <div id="push-controls"></div> and this script. The push
// sender's address comes from GET /config.json ("push_base_url"), else
// http://127.0.0.1:8084. The user's bearer token is window.notiflow.token when the
// page sets it, else localStorage "notiflow.token", else the page's ?token=.
//
// States, shown on the controls as data-state: "off", "on", "busy",
// "unsupported" (no service worker or Push API), "denied" (blocked in the browser).
//
// A browser has one push subscription, and it is on for the user whose
// subscriptions hold it. When someone else signs in (the page dispatches
// "notiflow:signed-in" on window, with the previous token as detail.previous),
// a subscription of the user before is taken off that user's list and given up in
// the browser, so that their notifications stop arriving on a screen that is no
// longer theirs; the controls then say off, until this user turns them on.
//
// Subscribing asks the browser's vendor push service, and when the browser cannot
// reach it, pushManager.subscribe() may never settle. The page waits
// window.notiflow.pushSubscribeTimeoutMs when set, else 20 s, then gives up.
(() => {
  "use strict";

  const DEFAULT_PUSH_URL = "http://127.0.0.1:8084";
  const SUBSCRIBE_TIMEOUT_MS = 20_000;
  const root = document.getElementById("push-controls");
  if (!root) return;

  const button = document.createElement("button");
  button.type = "button";
  button.id = "push-toggle";
  const status = document.createElement("span");
  status.id = "push-status";
  status.setAttribute("role", "status");
  status.setAttribute("aria-live", "polite");
  root.append(button, status);

  let pushUrl = null;
  let state = "busy";
  // The token of the user signed in before this one, while their subscription may
  // still be this browser's; and a count of checks, the latest of which decides.
  let previous = null;
  let checks = 0;
  // Counts the attempts to subscribe, so that a late answer knows if it is the last.
  let attempts = 0;

  function token() {
    if (window.notiflow && window.notiflow.token) return window.notiflow.token;
    return (
      localStorage.getItem("notiflow.token") ||
      new URLSearchParams(location.search).get("token")
    );
  }

  async function baseUrl() {
    if (pushUrl) return pushUrl;
    try {
      const response = await fetch("/config.json", { cache: "no-store" });
      const config = response.ok ? await response.json() : {};
      pushUrl = (config.push_base_url || DEFAULT_PUSH_URL).replace(/\/+$/, "");
    } catch (_) {
      pushUrl = DEFAULT_PUSH_URL;
    }
    return pushUrl;
  }

  async function api(path, options = {}, as = token()) {
    const headers = { Authorization: `Bearer ${as}`, ...options.headers };
    const response = await fetch(`${await baseUrl()}${path}`, {
      ...options,
      headers,
    });
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) {}
      throw new Error(detail);
    }
    return response.status === 204 ? null : response.json();
  }

  function supported() {
    return (
      "serviceWorker" in navigator &&
      "PushManager" in window &&
      "Notification" in window
    );
  }

  function render(next, message) {
    state = next;
    root.dataset.state = next;
    button.textContent =
      next === "on" ? "Disable notifications" : "Enable notifications";
    button.disabled = !["on", "off"].includes(next);
    if (message !== undefined) status.textContent = message;
  }

  function keyBytes(base64url) {
    const base64 = base64url.replace(/-/g, "+").replace(/_/g, "/");
    const raw = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
    return Uint8Array.from(raw, (c) => c.charCodeAt(0));
  }

  function subscribeTimeoutMs() {
    const set = window.notiflow && Number(window.notiflow.pushSubscribeTimeoutMs);
    return set > 0 ? set : SUBSCRIBE_TIMEOUT_MS;
  }

  // pushManager.subscribe(), given up on after a bounded wait. A subscription that
  // arrives after that is undone, unless a newer attempt is under way (the browser
  // hands that one the same subscription): the page already said it is off.
  async function subscribe(registration, options) {
    const attempt = ++attempts;
    const waitMs = subscribeTimeoutMs();
    let late = false;
    let timer;
    const subscribing = registration.pushManager.subscribe(options).catch((error) => {
      throw new Error(`the browser could not subscribe to push (${error.message})`);
    });
    subscribing.then(
      (subscription) => {
        if (late && attempt === attempts) subscription.unsubscribe().catch(() => {});
      },
      () => {},
    );
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => {
        late = true;
        reject(
          new Error(
            `the browser's push service did not answer in ${waitMs / 1000} s; ` +
              "check the connection and try again.",
          ),
        );
      }, waitMs);
    });
    try {
      return await Promise.race([subscribing, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  // The entry of ``subscriptions`` (a user's list) that is this browser's
  // ``subscription``; the push sender keeps an endpoint as a browser writes a URL.
  function storedIn(subscriptions, subscription) {
    const spelled = (url) => {
      try {
        return new URL(url).href;
      } catch (_) {
        return url;
      }
    };
    const endpoint = spelled(subscription.endpoint);
    return subscriptions.find((s) => spelled(s.endpoint) === endpoint);
  }

  async function currentSubscription() {
    const registration = await navigator.serviceWorker.getRegistration("/");
    return registration ? registration.pushManager.getSubscription() : null;
  }

  async function refresh() {
    if (!supported()) {
      render("unsupported", "This browser cannot show push notifications.");
      return;
    }
    if (Notification.permission === "denied") {
      render("denied", "Notifications are blocked in this browser's settings.");
      return;
    }
    const check = ++checks;
    const subscription = await currentSubscription();
    const as = token();
    if (!subscription || !as) {
      render("off", "");
      return;
    }
    const mine = await api("/push/subscriptions", {}, as);
    // A newer check, for whoever signed in since, decides.
    if (check !== checks) return;
    if (storedIn(mine, subscription)) {
      render("on", "");
      return;
    }
    render("busy", "");
    const before = previous;
    previous = null;
    if (before && before !== as) await forget(subscription, before).catch(() => {});
    await subscription.unsubscribe();
    if (check !== checks) return;
    render("off", "Notifications are off: this browser had them on for another user.");
  }

  // Takes this browser's subscription off the list of the user whose token is
  // ``as``. For the user who signed in before, should that fail (their token has
  // expired, say), the subscription is still given up in the browser, and the push
  // service refuses the next push to it, upon which the push sender forgets it.
  async function forget(subscription, as) {
    const stored = storedIn(await api("/push/subscriptions", {}, as), subscription);
    if (stored) {
      await api(`/push/subscriptions/${stored.id}`, { method: "DELETE" }, as);
    }
  }

  async function enable() {
    if (!token()) {
      render("off", "Sign in to enable notifications.");
      return;
    }
    render("busy", "Enabling…");
    const permission = await Notification.requestPermission();
    if (permission !== "granted") {
      render(
        permission === "denied" ? "denied" : "off",
        "Notifications were not allowed.",
      );
      return;
    }
    await navigator.serviceWorker.register("/sw.js", { scope: "/" });
    const registration = await navigator.serviceWorker.ready;
    const { public_key: key } = await api("/push/vapid-public-key");
    const subscription = await subscribe(registration, {
      userVisibleOnly: true,
      applicationServerKey: keyBytes(key),
    });
    try {
      await api("/push/subscriptions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(subscription.toJSON()),
      });
    } catch (error) {
      // A subscription the server does not know would never receive anything.
      await subscription.unsubscribe();
      throw error;
    }
    render("on", "Notifications are on for this browser.");
  }

  async function disable() {
    render("busy", "Disabling…");
    const subscription = await currentSubscription();
    if (subscription) {
      if (token()) await forget(subscription, token());
      await subscription.unsubscribe();
    }
    render("off", "Notifications are off for this browser.");
  }

  button.addEventListener("click", async () => {
    const wasOn = state === "on";
    try {
      await (wasOn ? disable() : enable());
    } catch (error) {
      const doing = wasOn ? "disable" : "enable";
      render(
        wasOn ? "on" : "off",
        `Could not ${doing} notifications: ${error.message}`,
      );
    }
  });

  function recheck() {
    refresh().catch((error) =>
      render("off", `Could not check notifications: ${error.message}`),
    );
  }

  window.addEventListener("notiflow:signed-in", (event) => {
    if (event.detail && event.detail.previous) previous = event.detail.previous;
    recheck();
  });
  window.notiflowPush = { refresh };
  render("busy", "");
  recheck();
})();
