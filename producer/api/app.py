"""The FastAPI application."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from common.errors import SdqError
from common.metrics import FleetCollector
from common.settings import Settings, get_settings
from common.webhooks import Dispatcher
from producer.api import errors, health, hotpot, v1
from producer.api.state import AppState

log = logging.getLogger(__name__)

DESCRIPTION = """
Self-hosted Stable Diffusion XL. Two APIs:

* **Hotpot-compatible** `POST /stable-diffusion-{budget,normal,premium}`: multipart fields
  `inputText`, `guidanceScale` and friends, header `Authorization: <key>`; answers with the
  image bytes and `X-API-Credits-Left`.
* **Async JSON** under `/v1`: submit a job, then poll it for presigned image URLs.

Errors are `{"code": N, "message": "..."}` with the HTTP status N.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = AppState.build(settings)

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
        yield
        stop.set()
        if dispatcher is not None:
            dispatcher.join(timeout=settings.webhook_timeout_seconds + 5)
        await state.aioredis.aclose()

    app = FastAPI(title="sdq", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.sdq = state
    errors.install(app)
    app.include_router(hotpot.router_for(state.tiers))
    app.include_router(v1.router)
    app.include_router(health.router)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FleetCollector(state.store.redis, state.tiers))

    @app.get("/metrics", tags=["Health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics of the whole fleet (they are kept in Redis)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
