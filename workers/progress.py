"""A running job's denoising steps, published off the device's critical path."""

from __future__ import annotations

import logging
import queue
import threading
from types import TracebackType

from redis.exceptions import RedisError

from common.job import Job, JobStatus
from common.store import JobStore

log = logging.getLogger(__name__)


class Canceled(Exception):
    """Raised from the step callback when the job was canceled while it ran."""


class StepReporter:
    """The step callback of a running job: each step is published (``job.progress``, its
    SSE event and webhook) by a thread of its own, in order, so the denoising loop never
    waits for a Redis round trip. The store's answer to a step tells whether the job is
    still running; a cancel it reports is raised at the next step after it arrives, so a
    canceled job stops within two steps.

    Use it as a context manager: leaving waits until every step is published, so that the
    job's terminal event always comes after its progress.
    """

    def __init__(self, store: JobStore, job: Job) -> None:
        self.store = store
        self.job = job
        self.canceled = False
        self._steps: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._publish, name="progress", daemon=True)

    def __enter__(self) -> StepReporter:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._steps.put(None)
        self._thread.join()

    def __call__(self, step: int, total: int) -> None:
        if self.canceled:
            raise Canceled()
        self._steps.put((step, total))

    def _publish(self) -> None:
        while (item := self._steps.get()) is not None:
            try:
                status = self.store.progress(self.job, *item)
            except RedisError as exc:
                # Progress is advice: a lost step must not fail a job that can still finish
                # (its own transitions retry, and fail loudly, if Redis stays away).
                log.warning("job %s: step %d not published: %s", self.job.id, item[0], exc)
                continue
            if status is not JobStatus.RUNNING:
                self.canceled = True
