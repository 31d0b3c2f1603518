"""Liveness and readiness."""

from __future__ import annotations

from functools import lru_cache

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.api.admin import is_admin
from producer.api.deps import State
from producer.schemas import Readiness

router = APIRouter(tags=["Health"])

#: A probe answers within about this long, whatever the store does: a load balancer's or
#: kubelet's probe must not hang on the store's own 15 s timeout and its retries.
PROBE_TIMEOUT_SECONDS = 2.0


@lru_cache(maxsize=4)
def _probe(url: str) -> redis.Redis:
    """A client of its own, with a short timeout and no retries, for readiness only."""
    return redis.Redis.from_url(
        url,
        socket_timeout=PROBE_TIMEOUT_SECONDS,
        socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "The job store does not answer."}},
)
def readyz(state: State, request: Request) -> JSONResponse:
    """Ready when the job store answers within 2 s: what this process needs to serve (the
    broker and the object storage are the workers' and the reconciler's to wait for). The
    checks, and the error a failed one gave, are shown only to the admin token
    (`Authorization: Bearer <SDQ_ADMIN_TOKEN>`)."""
    try:
        _probe(state.settings.redis_url).ping()
        store = "ok"
    except redis.RedisError as exc:
        store = f"error: {exc}"
    ready = store == "ok"
    body: dict[str, object] = {"ready": ready}
    if is_admin(state.settings, request.headers.get("authorization")):
        body["checks"] = {"store": store}
    return JSONResponse(body, status_code=200 if ready else 503)
