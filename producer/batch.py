"""``sdq batch``: render a JSONL file of prompts, resumably.

Every line is submitted with an Idempotency-Key derived from the file's content and the
line number, so a run that is killed and started again gets the same jobs back instead of
paying twice; lines already in ``results.jsonl`` are skipped.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from common.errors import InvalidRequest
from common.job import EXTENSIONS, JobRequest
from producer.client import ApiError, Client

RESULTS = "results.jsonl"


@dataclass
class LineResult:
    line: int
    job_id: str | None
    status: str
    files: list[str]
    error: str | None = None


def load(path: Path) -> list[JobRequest]:
    """Every request of the file, validated before anything is submitted."""
    requests = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            if isinstance(data, str):
                data = {"prompt": data}
            requests.append((number, JobRequest.model_validate(data)))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise InvalidRequest(f"{path}:{number}: {exc}") from None
    return [request for _, request in requests]


def finished_lines(out_dir: Path) -> set[int]:
    path = out_dir / RESULTS
    if not path.exists():
        return set()
    done = set()
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(int(json.loads(text)["line"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return done


class BatchRun:
    """Submits, waits for and saves every pending line, ``concurrency`` at a time."""

    def __init__(self, client: Client, source: Path, out_dir: Path, concurrency: int = 4) -> None:
        self.client = client
        self.out_dir = out_dir
        self.concurrency = concurrency
        self.requests = load(source)
        self.digest = hashlib.sha256(source.read_bytes()).hexdigest()[:24]
        self._lock = threading.Lock()

    def pending(self) -> list[int]:
        done = finished_lines(self.out_dir)
        return [line for line in range(1, len(self.requests) + 1) if line not in done]

    def run(self, on_done: Callable[[LineResult], None] | None = None) -> list[LineResult]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results: list[LineResult] = []

        def work(line: int) -> None:
            result = self.render(line)
            with self._lock:
                with (self.out_dir / RESULTS).open("a", encoding="utf-8") as out:
                    out.write(json.dumps(result.__dict__) + "\n")
                results.append(result)
                if on_done is not None:
                    on_done(result)

        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(work, self.pending()))
        return results

    def render(self, line: int) -> LineResult:
        request = self.requests[line - 1]
        try:
            job = self.client.submit(request, idempotency_key=f"sdq-batch-{self.digest}-{line}")
            job = self.client.wait(job.id)
        except ApiError as exc:
            return LineResult(line, None, "error", [], f"{exc.status_code}: {exc.message}")
        files = []
        for image in job.images:
            name = f"{line:05d}" + (f"_{image.index}" if image.index else "")
            path = self.out_dir / f"{name}.{EXTENSIONS[request.output_format]}"
            if image.url is not None:
                path.write_bytes(self.client.download(image.url))
                files.append(path.name)
        return LineResult(line, job.id, job.status.value, files, job.error)
