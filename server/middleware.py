"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks disconnect detection on streams).

- `BodyLimit`: 413 for a body over the limit, before any route reads it.
- `Authenticate`: API keys on `/v1/*` (as `vllm serve --api-key`), the admin key on
  `/v1/admin/*` and on changes to `/v1/vectors/*` and `/v1/saes/*`; 401 in OpenAI's error shape.
- `RefreshGauges`: reads the engine's slot counts right before `/metrics` is rendered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

log = logging.getLogger(__name__)

GUARDED_PREFIX = "/v1"
ADMIN_PREFIX = "/v1/admin"


# Routes outside ADMIN_PREFIX whose writes are the admin's (reads take the API key).
ADMIN_WRITES_PREFIX = ("/v1/vectors/", "/v1/saes/")
_WRITES = {"PUT", "POST", "DELETE", "PATCH"}


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", ""))


def _admin_only(path: str, method: str) -> bool:
    return path.startswith(ADMIN_PREFIX) or (
        path.startswith(ADMIN_WRITES_PREFIX) and method in _WRITES
    )


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> object:
        return error_response(
            413,
            f"request body is larger than {self.max_bytes} bytes "
            "(--max-request-body-bytes); send large vectors as files (--vectors-dir)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            return await self.app(scope, receive, send)
        # Chunked upload: buffer up to the limit, then replay it to the app.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticate:
    def __init__(self, app: ASGIApp, api_keys: list[str], admin_key: str | None):
        self.app = app
        self.api_keys = [_digest(k) for k in api_keys]
        self.admin_key = _digest(admin_key) if admin_key else None

    @staticmethod
    def _bearer(scope: Scope) -> bytes | None:
        value = Headers(scope=scope).get("authorization", "")
        scheme, _, token = value.partition(" ")
        return _digest(token.strip()) if scheme.lower() == "bearer" and token else None

    @staticmethod
    def _matches(token: bytes | None, keys: list[bytes]) -> bool:
        found = False
        for key in keys:  # constant time, whatever matches
            found |= token is not None and hmac.compare_digest(token, key)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        path = _path(scope)
        if _admin_only(path, scope["method"]):
            if self.admin_key is None:
                response = error_response(403, "admin routes are off: start with --admin-key")
                return await response(scope, receive, send)
            if not self._matches(self._bearer(scope), [self.admin_key]):
                return await self._unauthorized("admin key")(scope, receive, send)
        elif (
            path.startswith(GUARDED_PREFIX)
            and self.api_keys
            and not self._matches(
                self._bearer(scope), [*self.api_keys, *([self.admin_key] if self.admin_key else [])]
            )
        ):
            return await self._unauthorized("API key")(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _unauthorized(what: str) -> object:
        return error_response(
            401,
            f"missing or wrong {what} (send 'Authorization: Bearer <key>')",
            headers={"WWW-Authenticate": "Bearer"},
        )


class RefreshGauges:
    def __init__(self, app: ASGIApp, refresh: Callable[[], Awaitable[None]], timeout: float = 2.0):
        self.app = app
        self.refresh = refresh
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _path(scope).rstrip("/") == "/metrics":
            try:
                await asyncio.wait_for(self.refresh(), self.timeout)
            except Exception as e:  # a busy or dead engine must not break /metrics
                log.warning("steerserve: could not read engine gauges: %s", e)
        await self.app(scope, receive, send)
