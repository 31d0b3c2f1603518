"""Bounds on a request before the app sees it: the caller's key, then its body.

FastAPI reads a body before any dependency runs, so a caller without a key could make the
process read and parse megabytes. ``RequestLimits`` runs first: it authenticates every route
that takes a key (``deps.authenticate`` in its dependencies), and every admin route by the
admin token (``admin.require_admin``), from the headers alone, refuses a
``Content-Length`` over the route's limit unread, and reads the body itself, counting while
it arrives and within a deadline, before handing it on. A refusal whose body is left unread
closes the connection, so the server does not drain it either.

The routes that take an input image (``/v1/jobs``, ``/make-art``, the Hotpot forms) accept a
larger body, ``SDQ_MAX_IMAGE_BODY_BYTES``, only when its first bytes, within the route's own
limit, name the image field: a body without one is cut at that smaller limit, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.dependencies.models import Dependant
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.apikeys import AsyncKeyAuth
from common.errors import PayloadTooLarge, RateLimited, SdqError
from common.settings import Settings
from producer.api.admin import check_admin, require_admin
from producer.api.deps import KEY_STATE, authenticate
from producer.api.errors import ErrorBody, rate_limit_headers


class BodyTimeout(SdqError, TimeoutError):
    status_code = 408
    message = "the request body did not arrive in time"


class _ClientGone(Exception):
    pass


@dataclass(frozen=True)
class Policy:
    """What one route requires before its handler runs."""

    needs_key: bool
    max_body: int
    #: The larger limit of a body that names an input image (0: the route takes none).
    max_image_body: int = 0
    #: An admin route: the admin token, not an API key.
    needs_admin: bool = False

    @property
    def most(self) -> int:
        return max(self.max_body, self.max_image_body)


#: How a body names an input image: a JSON key, a form part's name, a url-encoded field.
IMAGE_MARKERS = (b'"init_image"', b'name="seedImage"', b"seedImage=")


def body_limit(path: str, settings: Settings) -> int:
    """The largest body a route's path accepts without an input image."""
    if path == "/v1/batches":
        return settings.max_batch_body_bytes
    if path.startswith("/stable-diffusion-") or path == "/make-art":
        return settings.max_form_body_bytes
    return settings.max_body_bytes


def image_body_limit(path: str, settings: Settings) -> int:
    """The largest body a route's path accepts with an input image; 0 where it takes none."""
    if path in ("/v1/jobs", "/make-art") or path.startswith("/stable-diffusion-"):
        return settings.max_image_body_bytes
    return 0


def _uses(dependant: Dependant, call: Any) -> bool:
    return any(sub.call is call or _uses(sub, call) for sub in dependant.dependencies)


class RequestLimits:
    """Pure ASGI middleware: authenticate, then read a bounded body within a deadline.

    ``routes`` are the API's own routes (``APIRoute``s, as the routers hold them): FastAPI
    nests included routers in the app's list, where the route a request is for, and so its
    dependencies, cannot be looked up."""

    def __init__(
        self, app: ASGIApp, *, settings: Settings, auth: AsyncKeyAuth, routes: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self.settings = settings
        self.auth = auth
        self.routes = routes
        self._policies: dict[int, Policy] = {}
        self._default = Policy(needs_key=False, max_body=settings.max_body_bytes)

    def policy(self, scope: Scope) -> Policy:
        """The policy of the route the request is for; a path none of ``routes`` knows
        (health, docs, a 404) needs no key and gets the default body limit."""
        partial: BaseRoute | None = None
        route: BaseRoute | None = None
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate  # the path exists, the method does not (405)
        route = route or partial
        if route is None:
            return self._default
        policy = self._policies.get(id(route))
        if policy is None:
            dependant = getattr(route, "dependant", None)
            needs_key = isinstance(dependant, Dependant) and _uses(dependant, authenticate)
            needs_admin = isinstance(dependant, Dependant) and _uses(dependant, require_admin)
            path = getattr(route, "path", "")
            methods = getattr(route, "methods", None) or set()
            policy = self._policies[id(route)] = Policy(
                needs_key,
                body_limit(path, self.settings),
                image_body_limit(path, self.settings) if "POST" in methods else 0,
                needs_admin=needs_admin,
            )
        return policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = _content_length(headers)
        has_body = "transfer-encoding" in headers or bool(length)
        policy = self.policy(scope)
        if policy.needs_key:
            try:
                key = await self.auth.authenticate(headers.get("authorization"))
            except SdqError as exc:
                await _refuse(exc, scope, receive, send, close=has_body, length=length)
                return
            scope.setdefault("state", {})[KEY_STATE] = key
        if policy.needs_admin:
            try:
                check_admin(self.settings, headers.get("authorization"))
            except SdqError as exc:
                await _refuse(exc, scope, receive, send, close=has_body, length=length)
                return
        if not has_body:
            await self.app(scope, receive, send)
            return
        if length is not None and length > policy.most:
            await _refuse(_too_large(policy.most), scope, receive, send, close=True, length=length)
            return
        try:
            body = await _read_body(receive, policy, self.settings.body_timeout_seconds)
        except SdqError as exc:
            await _refuse(exc, scope, receive, send, close=True, linger=False)
            return
        except _ClientGone:
            return
        await self.app(scope, _replay(body, receive), send)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body too large: at most {limit} bytes here")


def _names_image(chunks: list[bytes], within: int) -> bool:
    head = b"".join(chunks)[:within]
    return any(marker in head for marker in IMAGE_MARKERS)


async def _read_body(receive: Receive, policy: Policy, timeout: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    limit = policy.max_body
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                chunks.append(chunk)
                # Past the plain limit: read on only for a body that names an image.
                crossed = size > limit and limit < policy.max_image_body
                if crossed and _names_image(chunks, policy.max_body):
                    limit = policy.max_image_body
                if size > limit:
                    raise _too_large(limit)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g}s") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, then the server's own messages (``http.disconnect``)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _closing(send: Send) -> Send:
    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing


#: A refused request's body up to this size is read before the answer: closing a socket with
#: unread bytes sends a reset, and the client loses the answer (nginx's lingering close).
LINGER_BYTES = 64 * 1024
LINGER_SECONDS = 1.0


async def _linger(receive: Receive, length: int | None) -> None:
    if length is not None and length > LINGER_BYTES:
        return
    size = 0
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while size <= LINGER_BYTES:
                message = await receive()
                size += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
    except TimeoutError:
        return


async def _refuse(
    exc: SdqError,
    scope: Scope,
    receive: Receive,
    send: Send,
    close: bool,
    length: int | None = None,
    linger: bool = True,
) -> None:
    """The same body and headers the app's error handler gives ``exc``; a small unread body
    is read first, so the client gets the answer before the connection closes."""
    if close and linger:
        await _linger(receive, length)
    response = ErrorBody(exc.status_code, exc.message, **exc.details)
    if isinstance(exc, RateLimited):
        response.headers.update(rate_limit_headers(exc))
    await response(scope, receive, _closing(send) if close else send)


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
