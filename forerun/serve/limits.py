"""Two pure ASGI middlewares (no BaseHTTPMiddleware, which would buffer streams and hide client
disconnects): a request-body size limit, answered 413, and a count of answers by route and status."""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forerun.serve.errors import APIError, error_response
from forerun.serve.metrics import Metrics


class _TooLarge(HTTPException):
    pass


class BodyLimit:
    """413 for a body over max_bytes: at once when Content-Length says so, else (a chunked body)
    as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error_response(self._error())(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises an HTTPException met while reading the body
                    raise _TooLarge(413, self._error().message)
            return message

        await self.app(scope, limited, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")


class CountRequests:
    """forerun:requests_total{model_name, route, status}; paths that match no route count as route "other"."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            route = scope.get("route")
            self.metrics.count_request(getattr(route, "path", "other"), status)
