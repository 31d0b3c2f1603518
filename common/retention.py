"""Retention: a job's objects go a TTL after it succeeded, and at once when it
ends failed or canceled or is deleted.

The store's terminal step (``transition.lua``) adds the job to ``EXPIRY_KEY``, scored by when
it ended for a success and 0 (due at once) otherwise; ``job_delete.lua`` adds it at 0. The
reconciler's leader sweeps the set every round, in bounded batches: every object under the
job's prefix (its images, its image-to-image input) is deleted, then its entry. The TTL is
applied when sweeping, so a changed ``SDQ_IMAGE_TTL_SECONDS`` holds for jobs already ended.

Where the S3 server keeps bucket lifecycle rules, one expires the prefix a day beyond the TTL:
S3 counts whole days from an upload and deletes lazily (a presigned URL works until then), so
the exact expiry stays the sweeper's, and the rule catches what no entry names (the objects
of a record lost with its Redis).
"""

from __future__ import annotations

import logging
import time

import redis

from common.errors import StorageError
from common.redis_keys import EXPIRY_KEY
from common.settings import Settings
from common.storage import Storage, job_prefix

log = logging.getLogger(__name__)

#: Jobs one batch sweeps: each is a list and a delete on the S3 server.
BATCH = 100


class Sweeper:
    """Deletes the objects of jobs that are due, for the reconciler's leader."""

    def __init__(
        self, client: redis.Redis, storage: Storage, settings: Settings, batch: int = BATCH
    ) -> None:
        self.redis = client
        self.storage = storage
        self.prefix = settings.s3_prefix
        self.ttl = settings.effective_image_ttl
        self.batch = batch
        self._rule: bool | None = None

    @property
    def lifecycle(self) -> bool:
        """Whether the bucket keeps sdq's lifecycle rule (set on the first sweep)."""
        return bool(self._rule)

    def sweep(self, budget_seconds: float = 2.0) -> int:
        """Sweep due jobs, a batch at a time, until none is due or ``budget_seconds`` ran
        out; returns how many jobs were swept. A storage error leaves the rest for the next
        round."""
        if self._rule is None:
            self._rule = self._keep_rule()
        deadline = time.monotonic() + budget_seconds
        swept = 0
        while True:
            due = self.due()
            done = self._delete(due)
            if done:
                self.redis.zrem(EXPIRY_KEY, *done)
                swept += len(done)
            if len(done) < self.batch or time.monotonic() > deadline:
                return swept

    def due(self) -> list[str]:
        """The next batch of jobs whose objects are due, by the store's clock."""
        seconds, micros = self.redis.time()
        cutoff = seconds + micros / 1e6 - self.ttl
        return [str(i) for i in self.redis.zrangebyscore(EXPIRY_KEY, 0, cutoff, 0, self.batch)]

    def _delete(self, job_ids: list[str]) -> list[str]:
        done = []
        for job_id in job_ids:
            try:
                count = self.storage.delete_prefix(job_prefix(self.prefix, job_id))
            except StorageError as exc:
                log.warning("retention: job %s: %s; next round", job_id, exc.message)
                break
            if count:
                log.info("retention: job %s: %d object(s) deleted", job_id, count)
            done.append(job_id)
        return done

    def _keep_rule(self) -> bool:
        try:
            return self.storage.expire_prefix(f"{self.prefix.strip('/')}/", self.ttl)
        except StorageError as exc:
            log.warning("retention: no lifecycle rule (%s); the sweeper expires images", exc)
            return False
