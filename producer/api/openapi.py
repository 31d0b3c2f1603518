"""The OpenAPI document: the error answers routes document, the event stream's shape, and
what FastAPI writes that a valid 3.1 document must not hold. Swagger UI and ReDoc are served
from ``fastapi-offline``'s files (``ASSETS_URL``), so ``/docs`` works without internet."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from common.job import ALL_EVENTS
from producer.schemas import Error, Event

Responses = dict[int | str, dict[str, Any]]

#: Where the docs pages' scripts and stylesheets are served from.
ASSETS_URL = "/docs/assets"
#: No validator badge: Swagger UI would fetch it from swagger.io.
SWAGGER_UI: dict[str, Any] = {"validatorUrl": None}

TAGS: list[dict[str, Any]] = [
    {
        "name": "Hotpot-compatible",
        "description": "Drop-in for Hotpot.ai's Stable Diffusion API: a form in, image bytes out.",
    },
    {"name": "Jobs", "description": "Submit a job, follow it, fetch its images."},
    {"name": "Batches", "description": "Many jobs in one request, charged all or none."},
    {
        "name": "Account",
        "description": "The key's credits and limits; the tiers, models and styles on offer.",
    },
    {"name": "Health", "description": "Liveness, readiness and Prometheus metrics."},
    {
        "name": "Admin",
        "description": "For operators, with `Authorization: Bearer <SDQ_ADMIN_TOKEN>` (the "
        "`AdminToken` scheme): keys, top-ups, limits, webhook secret rotation, fleet usage and "
        "the audit log. Off (403) unless `SDQ_ADMIN_TOKEN` is set.",
    },
]
#: The credits a key has left, on every answer that charged or refunded it.
CREDITS_LEFT: dict[str, Any] = {
    "X-API-Credits-Left": {
        "description": "The key's credits after this request.",
        "schema": {"type": "integer"},
    }
}

_ERROR_REF = {"$ref": "#/components/schemas/Error"}

RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "Whole seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1},
    }
}
#: A refusal for the key's request rate also carries the IETF draft RateLimit fields.
RATE_HEADERS: dict[str, Any] = {
    **RETRY_AFTER,
    "RateLimit-Limit": {
        "description": "Over the request rate: the requests a second the key may make.",
        "schema": {"type": "string"},
    },
    "RateLimit-Remaining": {
        "description": "Over the request rate: 0.",
        "schema": {"type": "string"},
    },
    "RateLimit-Reset": {
        "description": "Over the request rate: seconds until a request is allowed.",
        "schema": {"type": "string"},
    },
}


def error(
    code: int, description: str, message: str, *, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One documented error answer: the ``Error`` body, an example ``message``."""
    response: dict[str, Any] = {
        "description": description,
        "content": {
            "application/json": {
                "schema": _ERROR_REF,
                "example": {"code": code, "message": message},
            }
        },
    }
    if headers:
        response["headers"] = headers
    return response


#: What every route that takes a key may answer before its handler runs.
KEYED: Responses = {
    401: error(
        401,
        "No API key: send it in the `Authorization` header.",
        "missing API key: send it in the Authorization header",
    ),
    403: error(403, "The API key is unknown or revoked.", "invalid API key"),
    429: error(
        429,
        "Over the key's request rate; `Retry-After` says when to retry.",
        "Rate limit exceeded: this key may make 10 requests a second",
        headers=RATE_HEADERS,
    ),
}
#: A route with a body: bounded in size and in how long it may take to arrive.
BODY_LIMITS: Responses = {
    408: error(
        408,
        "The body did not arrive within `SDQ_BODY_TIMEOUT_SECONDS`.",
        "the request body did not arrive within 30s",
    ),
    413: error(
        413,
        "The body is over the route's limit (`SDQ_MAX_BODY_BYTES`).",
        "request body too large: at most 65536 bytes here",
    ),
}
#: A route that takes an input image: a larger body, when it carries one.
IMAGE_BODY_LIMIT = error(
    413,
    "The body is over the route's limit: `SDQ_MAX_IMAGE_BODY_BYTES` when it carries an input "
    "image (`init_image`, `seedImage`, named within the first `SDQ_MAX_BODY_BYTES` or "
    "`SDQ_MAX_FORM_BODY_BYTES`), else that smaller limit. Nothing is charged.",
    "request body too large: at most 65536 bytes here",
)
#: A submit that names a model: the key may not be entitled to it.
MODEL_FORBIDDEN = error(
    403,
    "The API key is unknown or revoked, or not entitled to the `model` asked for (other "
    "than the tier's default, models are available upon request); nothing was charged.",
    "model sd15 is available upon request: this key is not entitled to it (tier normal "
    "serves sdxl to every key)",
)
#: A submit: over the key's credits, its jobs at once, or its request rate.
SUBMIT_REFUSED = error(
    429,
    "Not enough credits (no `Retry-After`: nothing was charged), too many jobs queued or "
    "running at once, or over the key's request rate (`Retry-After` says when to retry).",
    "not enough credits: this request costs 4, the key has 3",
    headers=RATE_HEADERS,
)
IDEMPOTENCY_CONFLICT = error(
    409,
    "This `Idempotency-Key` was used with another body, or its jobs have expired.",
    "this Idempotency-Key was already used with a different request; use a new key for a new "
    "request",
)
QUEUE_DOWN = error(
    503,
    "The broker refused the job; nothing was charged.",
    "the job queue is unavailable; nothing was charged",
)
#: An event stream or a sync wait: a key and a process hold only so many.
STREAMS_FULL = error(
    503,
    "This API process holds as many streams and waits as it may; `Retry-After` says when to "
    "retry (another process may have room).",
    "this API process has no room for another event stream; retry shortly",
    headers=RETRY_AFTER,
)


def event_stream(description: str) -> dict[str, Any]:
    """The 200 of a server-sent event stream in OpenAPI 3.1 terms: a text body, an example,
    and each event's shape under ``x-itemSchema`` (3.2's ``itemSchema``, which FastAPI writes
    but a 3.1 document may not hold; ``finish`` drops that)."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "id": {
                "type": "string",
                "description": "The event's sequence number (status changes only): resume "
                "after it with `Last-Event-ID`.",
            },
            "event": {"type": "string", "enum": ALL_EVENTS},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/Event"},
            },
        },
    }
    example = (
        "id: 1\nevent: job.queued\n"
        'data: {"type":"job.queued","timestamp":"2025-01-01T12:00:00Z","seq":1,'
        '"data":{"id":"job_0123","status":"queued"}}\n\n'
        "event: job.progress\n"
        'data: {"type":"job.progress","timestamp":"2025-01-01T12:00:01Z",'
        '"data":{"id":"job_0123","status":"running","progress":{"step":1,"total":30}}}\n\n'
    )
    return {
        "description": description,
        "content": {
            "text/event-stream": {
                "schema": {"type": "string", "description": "Server-sent events, as they come."},
                "example": example,
                "x-itemSchema": event,
            }
        },
    }


def operation_id(route: APIRoute) -> str:
    """The route's own name (``create_job``), which generated clients turn into methods."""
    return route.name


def install(app: FastAPI) -> None:
    """Serve the finished document at ``app.openapi_url``."""
    build = app.openapi  # FastAPI's: it caches what it returns in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(spec: dict[str, Any]) -> dict[str, Any]:
    """Fix up FastAPI's document: the ``Error`` and ``Event`` components; no 422 (a bad
    request answers 400, documented with the routes); no ``itemSchema``."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = Error.model_json_schema()
    schemas["Event"] = Event.model_json_schema()
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for response in responses.values():
                for media in response.get("content", {}).values():
                    media.pop("itemSchema", None)
    return spec
