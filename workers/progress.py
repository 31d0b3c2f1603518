"""A running job's denoising steps, published off the device's critical path."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from types import TracebackType

from redis.exceptions import RedisError

from common.job import Job, JobStatus, now
from common.store import JobStore

log = logging.getLogger(__name__)


class Canceled(Exception):
    """Raised from the step callback when the job was canceled while it ran."""


class StepReporter:
    """The step callback of a running job. Its steps go to the store from a thread of its
    own, in order, so the denoising loop never waits for Redis, and in batches, at most
    every ``interval`` seconds: each step is still its own ``job.progress`` event (and
    webhook), but a fast pipeline does not wake a thread and make a round trip for every
    step. On a machine whose cores all run the pipeline, each of those wake-ups stalls it:
    a step per round trip cost the tiny model 10% of its speed on 2 cores.

    The store's answer to a batch tells whether the job is still running; a cancel it
    reports is raised at the next step, so a canceled job stops within ``interval`` and
    two steps. Use it as a context manager: leaving publishes what is left and waits for
    it, so the job's terminal event always comes after its progress.
    """

    def __init__(self, store: JobStore, job: Job, interval: float = 0.1) -> None:
        self.store = store
        self.job = job
        self.interval = interval
        self.canceled = False
        self._steps: queue.SimpleQueue[tuple[int, int, float]] = queue.SimpleQueue()
        self._closing = threading.Event()
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
        self._closing.set()
        self._thread.join()

    def __call__(self, step: int, total: int) -> None:
        if self.canceled:
            raise Canceled()
        self._steps.put((step, total, now()))  # wakes nobody: the thread looks on its clock

    def _publish(self) -> None:
        closing = False
        while not closing:
            closing = self._closing.wait(self.interval)
            batch = []
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._steps.get_nowait())
            if not batch:
                continue
            try:
                status = self.store.progress(self.job, batch)
            except RedisError as exc:
                # Progress is advice: lost steps must not fail a job that can still finish
                # (its own transitions retry, and fail loudly, if Redis stays away).
                steps = ", ".join(str(step) for step, _, _ in batch)
                log.warning("job %s: steps %s not published: %s", self.job.id, steps, exc)
                continue
            if status is not JobStatus.RUNNING:
                self.canceled = True
