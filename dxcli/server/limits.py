"""The upload cap, enforced while the body arrives (an ASGI wrapper around the app).

A declared Content-Length over the cap is refused before a byte of the body is read; a body with
no declared length (chunked) is counted as it streams, and refused as soon as it passes the cap.
Either way the server never holds more than the cap of one request in memory.
"""

from __future__ import annotations

import json
from typing import Any, Callable

Scope = dict[str, Any]


class BodyTooLarge(Exception):
    pass


def error_payload(message: str, code: str | None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An error in OpenAI's shape, what every route of the server answers with."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps(error_payload(message, code, kind)).encode()


class UploadLimit:
    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        megabytes = self.max_bytes / 1024 / 1024
        body = error_body(f"the request is larger than this server's --max-upload-mb {megabytes:g}",
                          "upload_too_large")
        # Connection: close: the rest of the body is never read, so this connection cannot carry another request
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
