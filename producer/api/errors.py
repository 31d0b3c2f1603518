"""One place where errors become HTTP responses: ``{"code": N, "message": "..."}``."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from common.errors import InvalidRequest, RateLimited, SdqError
from common.hotpot import error_body
from common.job import JobRequest
from common.tiers import Tier, Tiers

log = logging.getLogger(__name__)


class ErrorBody(JSONResponse):
    def __init__(self, status: int, message: str, **details: object) -> None:
        super().__init__(error_body(status, message, **details), status_code=status)


#: Where a request's location names no field.
_SECTIONS = ("body", "query", "path", "header")
#: The fields a tier bounds more tightly than ``JobRequest``'s caps.
_TIER_BOUNDED = ("steps", "width", "height", "num_images")


def describe(
    error: ValidationError | RequestValidationError,
    rename: dict[str, str] | None = None,
    *,
    tiers: Tiers | None = None,
    body: object = None,
) -> str:
    """Pydantic's errors as one readable line: ``steps: Input should be ...; ...``.

    With ``tiers``, a job's ``steps``, ``width``, ``height`` or ``num_images`` over
    ``JobRequest``'s cap is refused with its tier's limit (``steps must be at most 30 on tier
    budget``), as a value under the cap and over the limit is. The tier is read from
    ``body``: by default the one a ``RequestValidationError`` holds."""
    if body is None and isinstance(error, RequestValidationError):
        body = error.body
    parts = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p not in _SECTIONS]
        field = ".".join((rename or {}).get(p, p) for p in loc) or "body"
        limit = _tier_limit(item, body, tiers) if tiers is not None else None
        if limit is not None:
            parent = ".".join((rename or {}).get(p, p) for p in loc[:-1])
            parts.append(f"{parent}: {limit}" if parent else limit)
            continue
        parts.append(f"{field}: {str(item.get('msg', 'invalid')).removeprefix('Value error, ')}")
    # A field name may itself be a lone surrogate, which the JSON answer could not encode.
    text = "; ".join(parts) or "invalid request"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _tier_limit(item: Any, body: object, tiers: Tiers) -> str | None:
    """The tier's message for a value over ``JobRequest``'s cap on a field its tier bounds
    more tightly; None when the error is another, or the tier is unknown or allows more."""
    cap = item.get("ctx", {}).get("le")
    loc = list(item.get("loc", ()))
    if loc[:1] and loc[0] in _SECTIONS:
        loc = loc[1:]
    if item.get("type") != "less_than_equal" or not loc or loc[-1] not in _TIER_BOUNDED:
        return None
    job = body  # the job request the field belongs to: the body, or a batch's jobs[i]
    for part in loc[:-1]:
        try:
            job = job[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    if not isinstance(job, dict) or not isinstance(cap, int):
        return None
    name = job.get("tier", JobRequest.model_fields["tier"].default)
    if not isinstance(name, str):
        return None
    try:
        tier = tiers.get(name.strip())
    except InvalidRequest:
        return None  # unknown: the schema's cap is all that can be said
    return _over(tier, loc[-1], cap)


def _over(tier: Tier, field: str, value: int) -> str | None:
    """``Tier.check_limits``'s message for ``field`` at ``value``, if it refuses it."""
    try:
        tier.check_limits(
            steps=value if field == "steps" else 1,
            width=value if field == "width" else None,
            height=value if field == "height" else None,
            images=value if field == "num_images" else 1,
        )
    except InvalidRequest as exc:
        return exc.message
    return None


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


def install(app: FastAPI, tiers: Tiers) -> None:
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
        return ErrorBody(400, describe(exc, tiers=tiers))

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
