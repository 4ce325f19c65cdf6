"""Pure ASGI middleware: request ids, API key, JSON bodies, header and body size, send timeout, and request
metrics."""

import asyncio
import hmac
import json
import logging
import re
import secrets

from starlette.exceptions import HTTPException

from app.errors import error_body
from app.routes_playground import PLAYGROUND_PATHS

log = logging.getLogger("quill")
OPEN_PATHS = {"/health", "/ready", *PLAYGROUND_PATHS}
SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")  # a caller's id goes into the log: nothing that could forge a line


async def send_error(send, status, message, type, headers=(), code=None):
    body = json.dumps(error_body(message, type, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestIDMiddleware:
    """Each request's id: the caller's X-Request-ID when it sends a plain one (a proxy's), else a new one. It is
    on request.state.request_id, in the X-Request-ID response header, and in the log lines of a failure."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given.decode() if SAFE_ID.fullmatch(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid  # in place: the app's 500 handler reads this scope too

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class APIKeyMiddleware:
    """Every route except /health, /ready and the playground's page needs `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time
                return await send_error(
                    send,
                    401,
                    "missing or wrong API key: send Authorization: Bearer KEY",
                    "authentication_error",
                    [(b"www-authenticate", b"Bearer")],
                    "invalid_api_key",
                )
        await self.app(scope, receive, send)


def is_json_type(content_type):
    """application/json or application/*+json, parameters aside: the types FastAPI reads as JSON."""
    mime = content_type.split(b";")[0].strip().lower()
    return mime == b"application/json" or (mime.startswith(b"application/") and mime.endswith(b"+json"))


class JSONBodyMiddleware:
    """Every POST body is read as JSON, whatever its declared Content-Type: `curl -d` declares a form.
    Only JSON stops a page on another site from posting here: a browser sends a form or text/plain
    body cross-site without asking first (no CORS preflight). So another type is accepted only when
    the request's Origin, if any, is this server's own or one that CORS allows (curl and SDKs send none)."""

    def __init__(self, app, cors_origins):
        self.app, self.trusted = app, {o.lower().encode() for o in cors_origins}

    def trusted_origin(self, scope, origin):
        own = f"{scope['scheme']}://".encode() + dict(scope["headers"]).get(b"host", b"")
        return origin.lower() in (own.lower(), *self.trusted) or b"*" in self.trusted

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            declared = headers.get(b"content-type", b"")
            if not is_json_type(declared):
                origin = headers.get(b"origin")
                if origin is not None and not self.trusted_origin(scope, origin):
                    return await send_error(
                        send,
                        403,
                        f"a cross-site request must send Content-Type: application/json "
                        f"(got {declared.decode('latin-1') or 'none'} from {origin.decode('latin-1')})",
                        "permission_error",
                    )
                scope = {
                    **scope,
                    "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                    + [(b"content-type", b"application/json")],
                }
        await self.app(scope, receive, send)


class HeaderLimitMiddleware:
    """Refuses more than `count` request headers, or more than `size` bytes of them, with 431."""

    def __init__(self, app, count, size):
        self.app, self.count, self.size = app, count, size

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope["headers"]
            if len(headers) > self.count:
                return await send_error(send, 431, f"more than {self.count} request headers", "invalid_request_error")
            if sum(len(k) + len(v) for k, v in headers) > self.size:
                return await send_error(send, 431, f"request headers over {self.size} bytes", "invalid_request_error")
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with 413, by Content-Length or while reading (chunked)."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_error(send, 413, message, "invalid_request_error")
        seen = 0

        async def limited_receive():
            nonlocal seen
            received = await receive()
            seen += len(received.get("body", b""))
            if seen > self.limit:
                # an HTTPException, because FastAPI turns any other error while reading the body into 400
                raise HTTPException(413, message)
            return received

        await self.app(scope, limited_receive, send)


class SendTimeoutMiddleware:
    """A client that stops reading blocks our sends; after `timeout` seconds we close on it."""

    def __init__(self, app, timeout):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timed_out = False

        async def timed_send(message):
            nonlocal timed_out
            try:  # a timeout scope, not wait_for: that makes a task for every send, a few tens of us a token
                async with asyncio.timeout(self.timeout):
                    await send(message)
            except TimeoutError:
                timed_out = True
                raise

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            if not timed_out:
                raise
            # A slow client, not a server error: one line, no traceback; the server closes the connection.
            log.warning("%s read nothing for %g s: its response is cut", scope.get("client"), self.timeout)


class MetricsMiddleware:
    """Counts each request once it ends, by route template and status. A stream that started
    with 200 but ended in an engine error counts as 500 (routes set scope['state']['failed'])."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            route = scope.get("route")
            if scope.get("state", {}).get("failed"):
                status = 500
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
