"""ASGI middleware around the routes: request counts, the API key, the body size limit.

Plain ASGI (not BaseHTTPMiddleware, which would get between the endpoints and their
client-disconnect checks); the key and the size are checked before the body is read.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Match

from server.errors import APIError, error_response
from server.metrics import Metrics


class CountRequests:
    """Count responses by route template and status. A response given before routing (a bad
    key, a body too large) counts under the route it was for."""

    def __init__(self, app, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope) -> str:
        route = scope.get("route") or next(
            (r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
        return getattr(route, "path", "other")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=self._route(scope),
                                             status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class RequireKey:
    """/v1/ routes need `Authorization: Bearer <key>`; without it, 401 before the body is
    read or checked (a stranger learns nothing about the request)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope.get("headers", [])).get(b"authorization", b"")
            scheme, _, key = header.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or key.strip() != self.key:
                response = error_response(APIError(
                    401, "invalid or missing API key (Authorization: Bearer <key>)",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """A request body over max_bytes gets 413 (by Content-Length up front, or once the bytes
    received pass the limit)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        too_large = response_started = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            nonlocal response_started
            if too_large:  # whatever the app makes of the interrupted read: 413 instead
                if not response_started:
                    response_started = True
                    await self._refuse(scope, receive, send)
                return
            response_started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not response_started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(413, f"the request body is over {self.max_bytes} bytes")
        await error_response(error)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
