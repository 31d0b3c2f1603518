"""``sdq batch``: render a JSONL file of prompts, resumably.

Every line is submitted with an Idempotency-Key derived from the file's content, the line
number and how many of the line's jobs ended failed or canceled before. A run that is
stopped (Ctrl-C, a kill) and started again therefore gets the jobs it had in flight back
instead of paying twice, while a line whose job failed gets a new job. ``results.jsonl``
records every line's outcome; only ``succeeded`` counts as done.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from common.errors import InvalidRequest, SdqError
from common.job import EXTENSIONS, JobRequest
from producer.client import ApiError, AuthenticationError, Client, UnreachableError
from producer.schemas import JobView

RESULTS = "results.jsonl"
#: Outcomes of a line whose job ran and ended without images: the next run makes a new job.
ENDED_BADLY = frozenset({"failed", "canceled"})
#: Tries of one request the API asked to retry later (429 or 503 with Retry-After).
TRIES = 5

T = TypeVar("T")


@dataclass
class LineResult:
    """One line's outcome: ``succeeded``, ``failed``, ``canceled`` (the job's status) or
    ``error`` (refused by the API, or its images could not be fetched)."""

    line: int
    job_id: str | None
    status: str
    files: list[str]
    error: str | None = None


@dataclass
class Summary:
    """Every line of the file by its latest outcome; ``pending`` lines have none yet."""

    total: int
    succeeded: int
    failed: int
    canceled: int
    pending: int

    @property
    def complete(self) -> bool:
        return self.succeeded == self.total


class _Stopped(Exception):
    """The run was stopped while a line waited on the API."""


class InvalidFile(InvalidRequest):
    """Lines of the file that cannot be submitted, each named (``line 2: ...``)."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        bad = f"{len(problems)} bad line" + ("s" if len(problems) > 1 else "")
        super().__init__(f"{path.name}: {bad}; nothing was submitted")


def load(path: Path, client: Client) -> dict[int, JobRequest]:
    """Every request of the file by line number, checked against the deployment's tiers
    before anything is submitted. Raises ``InvalidFile`` naming every bad line."""
    requests: dict[int, JobRequest] = {}
    problems: list[str] = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if isinstance(data, str):
            data = {"prompt": data}
        if not isinstance(data, dict):
            problems.append(f"line {number}: expected a JSON object or string")
            continue
        try:
            requests[number] = client.check(data)
        except InvalidRequest as exc:
            problems.append(f"line {number}: {exc.message}")
    if problems:
        raise InvalidFile(path, problems)
    if not requests:
        raise InvalidRequest(f"{path.name}: no jobs in it")
    return requests


def read_results(out_dir: Path) -> dict[int, list[LineResult]]:
    """Every recorded outcome, by line, oldest first."""
    path = out_dir / RESULTS
    records: dict[int, list[LineResult]] = {}
    if not path.exists():
        return records
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            result = LineResult(**json.loads(text))
        except (ValueError, TypeError):
            continue  # a line cut short by a kill
        records.setdefault(result.line, []).append(result)
    return records


class BatchRun:
    """Submits, waits for and saves every pending line, ``concurrency`` at a time, until
    done or ``stop()``: then no more lines are submitted, and jobs in flight are left to
    the next run, which gets them back by their Idempotency-Key."""

    def __init__(
        self,
        client: Client,
        source: Path,
        out_dir: Path,
        concurrency: int = 4,
        *,
        retry: bool = True,
    ) -> None:
        self.client = client
        self.out_dir = out_dir
        self.concurrency = concurrency
        self.retry = retry
        self.requests = load(source, client)
        self.digest = hashlib.sha256(source.read_bytes()).hexdigest()[:24]
        self.records = read_results(out_dir)
        #: What stopped the run unasked: the API unreachable, or the key refused.
        self.error: SdqError | None = None
        #: Lines whose job was submitted but not finished when the run stopped.
        self.in_flight = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def latest(self, line: int) -> str | None:
        records = self.records.get(line)
        return records[-1].status if records else None

    def pending(self) -> list[int]:
        """Lines to render: never finished, or (with ``retry``) not succeeded."""
        return [
            line
            for line in self.requests
            if self.latest(line) is None or (self.retry and self.latest(line) != "succeeded")
        ]

    def retried(self) -> list[int]:
        """Pending lines that did not succeed before."""
        return [line for line in self.pending() if self.latest(line) is not None]

    def summary(self) -> Summary:
        outcomes = [self.latest(line) for line in self.requests]
        return Summary(
            total=len(outcomes),
            succeeded=outcomes.count("succeeded"),
            failed=outcomes.count("failed") + outcomes.count("error"),
            canceled=outcomes.count("canceled"),
            pending=outcomes.count(None),
        )

    def idempotency_key(self, line: int) -> str:
        # A job that ended failed or canceled stays that job under its key: a retry needs
        # a new key. Anything else (refused, in flight, not downloaded) keeps the key.
        ended = sum(
            r.job_id is not None and r.status in ENDED_BADLY for r in self.records.get(line, [])
        )
        return f"sdq-batch-{self.digest}-{line}" + (f"-retry{ended}" if ended else "")

    def stop(self) -> None:
        """Submit nothing more; return from ``run`` once the requests in flight answer."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self, on_done: Callable[[LineResult], None] | None = None) -> list[LineResult]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results: list[LineResult] = []

        def work(line: int) -> None:
            result = self.render(line)
            if result is None:
                return
            with self._lock:
                with (self.out_dir / RESULTS).open("a", encoding="utf-8") as out:
                    out.write(json.dumps(asdict(result)) + "\n")
                self.records.setdefault(line, []).append(result)
                results.append(result)
                if on_done is not None:
                    on_done(result)

        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in [pool.submit(work, line) for line in self.pending()]:
                # Waits in short slices: a signal that lands on another thread runs its
                # Python handler (Ctrl-C's stop) only once the main thread wakes.
                while True:
                    try:
                        future.result(timeout=0.2)
                        break
                    except TimeoutError:
                        continue
        return results

    def render(self, line: int) -> LineResult | None:
        """The line's outcome, or ``None`` when the run stopped first."""
        request = self.requests[line]
        try:
            job = self._call(
                self.client.submit, request, idempotency_key=self.idempotency_key(line)
            )
        except _Stopped:
            return None  # the job, if the API made it, is the next run's
        except ApiError as exc:
            return LineResult(line, None, "error", [], f"{exc.status_code}: {exc.message}")
        try:
            job = self._wait(job.id)
            files = self._save(line, request, job)
        except _Stopped:
            with self._lock:
                self.in_flight += 1
            return None
        except ApiError as exc:
            return LineResult(line, job.id, "error", [], f"{exc.status_code}: {exc.message}")
        except SdqError as exc:
            return LineResult(line, job.id, "error", [], exc.message)
        return LineResult(line, job.id, job.status.value, files, job.error)

    def _wait(self, job_id: str) -> JobView:
        """The job once it has ended."""
        interval = 0.05
        while True:
            job = self._call(self.client.get, job_id)
            if job.status.terminal:
                return job
            self._stop.wait(interval)
            interval = min(interval * 2, 1.0)

    def _save(self, line: int, request: JobRequest, job: JobView) -> list[str]:
        files = []
        for image in job.images:
            name = f"{line:05d}" + (f"_{image.index}" if image.index else "")
            path = self.out_dir / f"{name}.{EXTENSIONS[request.output_format]}"
            if image.url is not None:
                path.write_bytes(self.client.download(image.url))
                files.append(path.name)
        return files

    def _call(self, method: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``method(...)``, again after the wait the API asked for (429 or 503 with
        Retry-After). Raises ``_Stopped`` once the run is stopped, and stops it when the API
        is unreachable or refuses the key: every other line would meet the same."""
        for attempt in range(1, TRIES + 1):
            if self.stopped:
                raise _Stopped
            try:
                return method(*args, **kwargs)
            except (UnreachableError, AuthenticationError) as exc:
                self._halt(exc)
                raise _Stopped from None
            except ApiError as exc:
                if exc.retry_after is None or attempt == TRIES:
                    raise
                self._stop.wait(min(exc.retry_after, 30.0))
        raise _Stopped

    def _halt(self, exc: SdqError) -> None:
        with self._lock:
            self.error = self.error or exc
        self.stop()
