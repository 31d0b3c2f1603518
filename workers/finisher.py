"""Encode, upload and end jobs on a thread of their own, so that a GPU worker's pipeline
starts the next job instead of waiting for S3.

The task hands a job over once its images exist and returns; its message is acked. The job
keeps its lease until it is finished here, so a process that dies meanwhile leaves a job
whose lease runs out and that the reconciler requeues: nothing is lost, only rerun. At most
``depth`` jobs wait their turn: a pipeline faster than its uploads waits for them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Work = Callable[[], object]


class Finisher:
    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue[Work] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def submit(self, work: Work) -> None:
        """Run ``work`` after the jobs handed over before it; blocks while ``depth`` wait."""
        self._start()
        self._queue.put(work)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every job handed over to finish (a pool child
        about to exit calls it); whether they did."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def _start(self) -> None:
        # Started in the process that uses it: a thread does not survive the pool's fork.
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="finisher", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            work = self._queue.get()
            try:
                work()
            except Exception:  # the work ends its own job; this thread must outlive it
                log.exception("finishing a job failed")
            finally:
                self._queue.task_done()
