"""What every request handler needs, made once per app."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from celery import Celery

from common.apikeys import AsyncKeyAuth, KeyStore
from common.models import Models, load_models
from common.queue import make_celery
from common.redis import connect, connect_async
from common.settings import Settings
from common.storage import Storage, make_storage
from common.store import JobStore
from common.tiers import Tiers, load_tiers
from common.webhooks import Deliveries
from producer.jobs import JobService


@dataclass
class AppState:
    settings: Settings
    tiers: Tiers
    models: Models
    store: JobStore
    keys: KeyStore
    auth: AsyncKeyAuth
    storage: Storage
    celery: Celery
    jobs: JobService
    deliveries: Deliveries
    aioredis: aioredis.Redis

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        tiers = load_tiers(settings.tiers_file)
        timeout = settings.redis_socket_timeout_seconds
        client = connect(settings.redis_url, timeout=timeout)
        aclient = connect_async(settings.redis_url, timeout=timeout)
        store = JobStore.from_settings(settings, client, aio=aclient)
        celery = make_celery(settings, tiers)
        storage = make_storage(settings)
        return cls(
            settings=settings,
            tiers=tiers,
            models=load_models(settings.models_file),
            store=store,
            keys=KeyStore(client, settings.default_rate_per_second),
            auth=AsyncKeyAuth(aclient, settings.default_rate_per_second),
            storage=storage,
            celery=celery,
            jobs=JobService(settings, store, tiers, celery, storage=storage),
            deliveries=Deliveries(client, settings),
            aioredis=aclient,
        )
