"""ASGI middleware that answers 413 for request bodies over the configured limit.

Checks ``Content-Length`` before the body is read and counts bytes while it streams, so chunked
uploads are bounded too. Applied to the whole BentoML service (task endpoints and /v2 alike).
"""

from __future__ import annotations

import json


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await self._reply(
                        send, 400, f"invalid Content-Length {value.decode(errors='replace')!r}"
                    )
                if length > self.max_bytes:
                    return await self._reply(send, 413, self._message(length))
        received = 0
        started = replied = False

        async def limited_receive():
            nonlocal received, replied
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not replied:
                        replied = True
                        await self._reply(send, 413, self._message(received))
                    # Tell the app the client is gone so it stops reading; its reply is dropped below.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if replied:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the server's limit of {self.max_bytes} bytes "
            "(KILN_MAX_REQUEST_BYTES / kiln serve --max-request-bytes)"
        )

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
