"""The request-body limit: a body over the operator's max_body_bytes is refused from its Content-Length before
it is sent, or once its streamed bytes pass the cap, so neither time nor memory goes into it."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from the body's stream; an HTTPException so that FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_text(limit))


class BodyLimit:
    """ASGI middleware. Uploads (`/uploads`) are streamed to disk and held to the upload cap by their handler instead."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app = app
        self.limit = limit  # the bytes allowed now (an operator may change it live)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") == "/uploads":
            await self.app(scope, receive, send)
            return
        limit: int = self.limit()
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)


def _too_large_text(limit: int) -> str:
    return f"The request body is over this server's cap max_body_bytes = {limit:,}; send less or ask an operator."


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": _too_large_text(limit)}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
