// The service worker keeps the app shell (never /api) so the console opens
// on a flaky network; the API always goes to the network. It also shows the
// server's Web Push notes and opens their session when one is tapped
// (README "Notifications").
const CACHE = "breakglass-shell-v5";
const SHELL = ["/", "/app.js", "/transcript.js", "/approval.js", "/style.css", "/manifest.webmanifest", "/icon.svg", "/icon-192.png", "/icon-512.png"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k)))).then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname.startsWith("/api/") || url.pathname === "/login" || url.pathname === "/health" || url.pathname === "/metrics") return;
  if (!SHELL.includes(url.pathname)) return;
  // Network first (a fresh console after an upgrade), but never for long: a
  // stalled link gets the cached shell after 3 s, and offline at once.
  event.respondWith(
    (async () => {
      const network = fetch(event.request).then((response) => {
        if (response.ok) {
          const copy = response.clone();
          caches.open(CACHE).then((cache) => cache.put(event.request, copy));
        }
        return response;
      });
      const cached = await caches.match(event.request);
      if (!cached) return network;
      const slow = new Promise((resolve) => setTimeout(() => resolve(cached), 3000));
      return Promise.race([network.catch(() => cached), slow]);
    })(),
  );
});

// A push message is the note as JSON: {title, body, priority, url, kind, session}.
// The link is built here, on this worker's own origin, so it works whether
// or not the server knows its public address.
self.addEventListener("push", (event) => {
  let note = {};
  try {
    note = event.data ? event.data.json() : {};
  } catch {
    note = { body: event.data ? event.data.text() : "" };
  }
  const url = note.session ? `/?session=${encodeURIComponent(note.session)}` : "/";
  event.waitUntil(
    self.registration.showNotification(note.title || "breakglass", {
      body: note.body || "",
      tag: note.session || note.kind || "breakglass",
      renotify: true,
      requireInteraction: note.kind === "approval",
      icon: "/icon-192.png",
      data: { url },
    }),
  );
});

// A tap opens the note's session: in a console window already open if there
// is one, in a new one otherwise.
self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const url = new URL(event.notification.data?.url || "/", self.location.origin).href;
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      for (const client of windows) {
        if (new URL(client.url).origin !== self.location.origin) continue;
        const moved = await client.navigate(url).catch(() => null);
        return (moved || client).focus();
      }
      return self.clients.openWindow(url);
    })(),
  );
});
