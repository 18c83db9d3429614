"""Security headers on every response (a Content-Security-Policy, no framing) and /docs served from the
packaged Swagger UI assets, so neither the dashboard nor the API docs load anything from another origin."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS_ASSETS = "/docs-assets"
# Everything from this origin only; no inline script, no framing by another site.
_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
_ALL_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _docs_page(openapi_url: str, title: str) -> tuple[bytes, str]:
    """The Swagger UI page and its policy: its one inline script is allowed by its hash, nothing else inline."""
    page = get_swagger_ui_html(
        openapi_url=openapi_url, title=title,
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
    ).body
    inline = re.findall(rb"<script>(.*?)</script>", page, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in inline)
    # Swagger UI's React components set inline styles.
    return page, _POLICY.replace("default-src 'self';", f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline';")


def install(app: FastAPI) -> None:
    """Add the headers middleware and the /docs page; the app must be created with docs_url=None."""
    page, docs_policy = _docs_page(app.openapi_url or "/openapi.json", f"{app.title} - API")
    app.mount(DOCS_ASSETS, StaticFiles(directory=Path(swagger_ui_bundle.swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": docs_policy})

    app.add_middleware(SecurityHeaders)


class SecurityHeaders:
    """ASGI middleware (not BaseHTTPMiddleware, which wraps every body and event stream) adding the policy headers
    to each response that has not set its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _ALL_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
