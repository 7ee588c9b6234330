// The notiflow service worker: shows Web Push notifications, opens them on click.
//
// Served at /sw.js so that its scope ("/") covers the page. A push carries the
// JSON {title, body, url, notification_id}. The notification's tag is the thread
// (the "post" query parameter of the url), so a newer push about the same thread
// replaces the older one on screen, as the Topic header does at the push service.
"use strict";

self.addEventListener("install", () => self.skipWaiting());

self.addEventListener("activate", (event) => {
  event.waitUntil(self.clients.claim());
});

function readPush(event) {
  if (!event.data) return {};
  try {
    return event.data.json();
  } catch (_) {
    return { body: event.data.text() };
  }
}

// Only pages of the web: a payload can never make us open another scheme.
function safeUrl(value) {
  try {
    const url = new URL(value || "/", self.location.origin);
    return url.protocol === "https:" || url.protocol === "http:" ? url : null;
  } catch (_) {
    return null;
  }
}

function threadTag(url) {
  const post = url && url.searchParams.get("post");
  return post ? `notiflow-post-${post}` : undefined;
}

self.addEventListener("push", (event) => {
  const data = readPush(event);
  const url = safeUrl(data.url) || new URL("/", self.location.origin);
  const tag = threadTag(url);
  const options = {
    body: data.body || "",
    data: { url: url.href, notification_id: data.notification_id },
  };
  if (tag) {
    options.tag = tag;
    options.renotify = true;
  }
  event.waitUntil(
    self.registration.showNotification(data.title || "notiflow", options),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const target = safeUrl(event.notification.data && event.notification.data.url);
  if (!target) return;
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({
        type: "window",
        includeUncontrolled: true,
      });
      for (const client of windows) {
        if (client.url === target.href && "focus" in client) {
          return client.focus();
        }
      }
      return self.clients.openWindow(target.href);
    })(),
  );
});
