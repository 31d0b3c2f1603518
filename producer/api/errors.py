"""One place where errors become HTTP responses: ``{"code": N, "message": "..."}``."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from common.errors import RateLimited, SdqError

log = logging.getLogger(__name__)


class ErrorBody(JSONResponse):
    def __init__(self, status: int, message: str, **details: object) -> None:
        super().__init__({"code": status, "message": message, **details}, status_code=status)


def describe(
    error: ValidationError | RequestValidationError, rename: dict[str, str] | None = None
) -> str:
    """Pydantic's errors as one readable line: ``steps: Input should be ...; ...``."""
    parts = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join((rename or {}).get(p, p) for p in loc) or "body"
        parts.append(f"{field}: {str(item.get('msg', 'invalid')).removeprefix('Value error, ')}")
    # A field name may itself be a lone surrogate, which the JSON answer could not encode.
    text = "; ".join(parts) or "invalid request"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def rate_limit_headers(exc: RateLimited) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1), and the IETF draft RateLimit fields
    when the refusal came from the key's request rate."""
    wait = max(1, math.ceil(exc.retry_after))
    headers = {"Retry-After": str(wait)}
    limit = exc.details.get("rate_limit")
    if limit is not None:
        headers["RateLimit-Limit"] = str(limit)
        headers["RateLimit-Remaining"] = "0"
        headers["RateLimit-Reset"] = str(wait)
    return headers


def install(app: FastAPI) -> None:
    @app.exception_handler(SdqError)
    async def sdq_error(request: Request, exc: SdqError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        body = ErrorBody(exc.status_code, exc.message, **exc.details)
        if isinstance(exc, RateLimited):
            body.headers.update(rate_limit_headers(exc))
        return body

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return ErrorBody(400, describe(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return ErrorBody(exc.status_code, message)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ErrorBody(500, "internal server error")
