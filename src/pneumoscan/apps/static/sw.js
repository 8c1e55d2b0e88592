// pneumoscan's service worker: after one visit the page, the runtime and the model load with the network off.
// The page and the model's settings are asked of the network first (a new model shows at once); the runtime and the
// model's files are kept by URL, which carries their sha256, so a new model is a new entry. The API is never kept.
const CACHE = "pneumoscan-v2";  // a new name when the page's files change: the old copies are dropped
// The page itself is kept at install; the runtime and the model (tens of MB) are kept the first time the page asks
// for them, so a first visit downloads each once.
const SHELL = [
  "/", "/static/app.js", "/static/device.js", "/static/style.css", "/static/manifest.webmanifest",
  "/static/icon-192.png", "/static/icon-512.png",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok) cache.put(request, response.clone());
    return response;
  } catch (e) {
    const kept = await cache.match(request);
    if (kept) return kept;
    throw e;
  }
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const kept = await cache.match(request);
  if (kept) return kept;
  const response = await fetch(request);
  if (response.ok) cache.put(request, response.clone());
  return response;
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname === "/" || url.pathname === "/model/device.json") event.respondWith(networkFirst(event.request));
  else if (url.pathname.startsWith("/static/") || url.pathname.startsWith("/model/")) event.respondWith(cacheFirst(event.request));
});
