"""The FastAPI application."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from starlette.concurrency import run_in_threadpool

from common.errors import SdqError
from common.metrics import FleetCollector
from common.settings import Settings, get_settings
from common.webhooks import Dispatcher
from producer.api import admin, errors, health, hotpot, openapi, ui, usage, v1
from producer.api.admin import check_bearer
from producer.api.limits import RequestLimits
from producer.api.state import AppState
from producer.hub import Hub
from producer.reconciler import Reconciler

log = logging.getLogger(__name__)

DESCRIPTION = """
Self-hosted Stable Diffusion XL. Two APIs:

* **Hotpot-compatible** `POST /stable-diffusion-{budget,normal,premium}`: multipart fields
  `inputText`, `guidanceScale` and friends, header `Authorization: <key>`; answers with the
  image bytes and `X-API-Credits-Left`.
* **Async JSON** under `/v1`: submit a job, then poll it for presigned image URLs.
* **A playground** at [`/ui`](/ui): type a prompt, watch it render, browse your jobs.

Every route but health's takes the key: press **Authorize** and paste it (bare, as Hotpot
takes it). Errors are `{"code": N, "message": "..."}` with the HTTP status N.
"""


#: The largest incomplete request head the h11 parser buffers (httptools, uvicorn's choice
#: when installed, has no such bound).
MAX_HEADER_BYTES = 16 * 1024


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options that bound connections: how many, how long they may idle, how much
    of an incomplete request head is buffered, and how long a shutdown waits for open
    streams. Bodies are bounded in size and time by ``RequestLimits``."""
    return {
        # h11, not httptools: it bounds a request head's size, and BoundedH11Protocol its time.
        "http": "producer.api.protocol:BoundedH11Protocol",
        "timeout_keep_alive": settings.api_keep_alive_seconds,
        # Over it, a request is answered 503 at once instead of queueing in the process.
        "limit_concurrency": settings.api_max_connections,
        "backlog": min(2048, settings.api_max_connections),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        # Event streams stay open for up to stream_max_seconds: do not wait that long.
        "timeout_graceful_shutdown": 10,
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = AppState.build(settings)
    hub = Hub(
        state.aioredis,
        per_key=settings.streams_per_key,
        per_process=settings.streams_per_process,
    )

    registry = CollectorRegistry(auto_describe=True)
    registry.register(FleetCollector(state.store.redis, state.tiers))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            # A fresh deployment (docker compose, Kubernetes) gets its bucket here.
            await run_in_threadpool(state.storage.ensure_bucket)
        except SdqError as exc:
            log.warning("could not ensure the bucket: %s (see /readyz)", exc.message)
        stop = threading.Event()
        dispatcher = None
        if settings.webhook_dispatcher:
            # Webhooks go out from every API process; claims keep them from sending twice.
            run = Dispatcher(state.store.redis, settings).run
            dispatcher = threading.Thread(target=run, args=(stop,), name="webhooks", daemon=True)
            dispatcher.start()
        if settings.reconciler:
            # In every API process; one leads at a time.
            reconcile = Reconciler(state.jobs).run
            threading.Thread(target=reconcile, args=(stop,), name="reconciler", daemon=True).start()
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = serve_metrics(settings.metrics_port, settings, registry)
        await hub.start()
        yield
        await hub.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        stop.set()
        if dispatcher is not None:
            dispatcher.join(timeout=settings.webhook_timeout_seconds + 5)
        await state.aioredis.aclose()

    # /docs and /redoc from the package's own Swagger UI and ReDoc files, not a CDN.
    app = FastAPIOffline(
        title="sdq",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=openapi.TAGS,
        generate_unique_id_function=openapi.operation_id,
        swagger_ui_parameters=openapi.SWAGGER_UI,
        static_url=openapi.ASSETS_URL,
    )
    openapi.install(app)
    app.state.sdq = state
    app.state.hub = hub
    errors.install(app, state.tiers)
    routers = [hotpot.router_for(state.tiers), v1.router, usage.router, admin.router]
    routers += [health.router, ui.router]
    for router in routers:
        app.include_router(router)
    # Authenticate and bound the body before FastAPI reads it (it does, before dependencies).
    routes = [route for router in routers for route in router.routes]
    app.add_middleware(RequestLimits, settings=settings, auth=state.auth, routes=routes)
    if settings.metrics_port is None:
        add_metrics_route(app, registry, settings)
    return app


def serve_metrics(port: int, settings: Settings, registry: CollectorRegistry) -> Any:
    """Metrics on ``SDQ_METRICS_PORT``, for a scraper on a network the API's clients cannot
    reach. With several API worker processes the first to bind it serves the whole fleet's
    figures (they are read from Redis); the others go on without it."""
    try:
        server, _ = start_http_server(port, addr=settings.api_host, registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # Another API worker process, or else something else: say which port, loudly.
        log.warning("SDQ_METRICS_PORT %s is in use: not serving the metrics here", port)
        return None
    return server


def add_metrics_route(app: FastAPI, registry: CollectorRegistry, settings: Settings) -> None:
    """``GET /metrics`` on the API's port, behind ``SDQ_METRICS_TOKEN`` when it is set."""
    token = settings.metrics_token

    @app.get(
        "/metrics",
        tags=["Health"],
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
            401: openapi.error(401, "SDQ_METRICS_TOKEN is set and no token was sent.", NO_TOKEN),
            403: openapi.error(403, "The token is not SDQ_METRICS_TOKEN.", WRONG_TOKEN),
        },
    )
    def metrics(request: Request) -> Response:
        """Prometheus metrics of the whole fleet (they are kept in Redis). With
        `SDQ_METRICS_TOKEN` set, only to `Authorization: Bearer <token>`."""
        if token is not None:
            check_bearer(token, request.headers.get("authorization"), NO_TOKEN, WRONG_TOKEN)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


NO_TOKEN = "missing metrics token: send Authorization: Bearer <SDQ_METRICS_TOKEN>"
WRONG_TOKEN = "invalid metrics token"
