"""A running job's lease in the store, renewed while its worker runs it."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from redis.exceptions import RedisError

from common.store import JobStore

log = logging.getLogger(__name__)


class Lease:
    """Renews the lease of run ``attempt`` of a job every third of its length, from a thread
    (the pipeline may go minutes without a step, on the remote path). ``lost`` turns true
    when the store says this run no longer holds the job: it was canceled or ended, or its
    lease ran out and another worker took it over. A renewal the store refuses is logged:
    the run goes on, and if the lease runs out meanwhile the reconciler requeues the job."""

    def __init__(self, store: JobStore, job_id: str, attempt: int) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.store.lease_seconds / 3):
            try:
                held = self.store.heartbeat(self.job_id, self.attempt)
            except RedisError as exc:
                log.warning("job %s: lease not renewed: %s", self.job_id, exc)
                continue
            if held is None:
                log.warning("job %s: this run no longer holds the job", self.job_id)
                self.lost = True
                return
