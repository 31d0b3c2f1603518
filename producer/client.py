"""A Python client for sdq's ``/v1`` API, on httpx."""

from __future__ import annotations

import time
from typing import Any

import httpx

from common.errors import JobTimeout, SdqError
from common.job import Job, JobRequest


class ApiError(SdqError):
    """An error answer of the API: its status code and message."""

    def __init__(self, status_code: int, message: str, **details: object) -> None:
        self.status_code = status_code
        super().__init__(message, **details)


class Client:
    """``Client(url, key)``: submit jobs, read them, wait for them, fetch their images."""

    def __init__(self, url: str, key: str, *, timeout: float = 30.0) -> None:
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            try:
                body = response.json()
                message = body.pop("message", response.text)
                body.pop("code", None)
            except ValueError:
                body, message = {}, response.text
            raise ApiError(response.status_code, message, **body)
        return response.json()

    def submit(self, request: JobRequest | None = None, **fields: Any) -> Job:
        """Queue a job from a ``JobRequest`` or its fields (``prompt=...``)."""
        body = (request or JobRequest.model_validate(fields)).model_dump(exclude_none=True)
        return Job.model_validate(self._call("POST", "/v1/jobs", json=body) | {"key_id": ""})

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._call("GET", f"/v1/jobs/{job_id}") | {"key_id": ""})

    def wait(self, job_id: str, timeout: float = 600.0, interval: float = 0.25) -> Job:
        """Poll until the job is terminal."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.status.terminal:
                return job
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {job_id} still {job.status.value} after {timeout:.0f}s")
            time.sleep(interval)

    def download(self, url: str) -> bytes:
        response = httpx.get(url, timeout=self.http.timeout)
        response.raise_for_status()
        return response.content

    def account(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/account")
        return result
