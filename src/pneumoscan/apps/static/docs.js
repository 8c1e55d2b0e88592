// The interactive API docs. The key the page was given in this tab (sessionStorage) goes with every request they make.
"use strict";
const KEY = "pneumoscan-api-key";
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  requestInterceptor: (request) => {
    const key = sessionStorage.getItem(KEY);
    if (key) request.headers["X-API-Key"] = key;
    return request;
  },
});
