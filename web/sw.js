// The service worker keeps the app shell (never /api) so the console opens
// on a flaky network; the API always goes to the network.
const CACHE = "breakglass-shell-v3";
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
