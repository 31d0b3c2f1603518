"""A Python client for sdq's ``/v1`` API, on httpx.

from producer.client import Client

with Client("http://127.0.0.1:8000", key) as sdq:
    job = sdq.submit(prompt="a lighthouse at dusk", tier="premium")
    for event in sdq.events(job.id):
        print(event.type, event.data.get("progress"))
    job = sdq.get(job.id)
    image = sdq.download(job.images[0].url)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse

from common.errors import JobTimeout, SdqError
from common.job import JobRequest, JobStatus
from producer.schemas import Account, BatchView, Event, JobPage, JobView, TierList, TierView

TERMINAL_EVENTS = {"job.succeeded", "job.failed", "job.canceled"}


class ApiError(SdqError):
    """An error answer of the API: its HTTP status, message and extra fields."""

    def __init__(self, status_code: int, message: str, **details: object) -> None:
        self.status_code = status_code
        super().__init__(message, **details)


class InvalidRequestError(ApiError):
    """400: the request was refused; nothing was charged."""


class AuthenticationError(ApiError):
    """401 (no key) or 403 (unknown key)."""


class NotFoundError(ApiError):
    """404."""


class ConflictError(ApiError):
    """409: an Idempotency-Key reused with another body, or a cancel of an ended job."""


class InsufficientCreditsError(ApiError):
    """429: not enough credits."""


class ServerError(ApiError):
    """5xx."""


_ERRORS: dict[int, type[ApiError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    429: InsufficientCreditsError,
}


def _raise_for(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = dict(response.json())
        message = str(body.pop("message", response.text))
        body.pop("code", None)
    except ValueError:
        body, message = {}, response.text
    cls = _ERRORS.get(
        response.status_code, ServerError if response.status_code >= 500 else ApiError
    )
    raise cls(response.status_code, message, **body)


class Client:
    """``Client(url, key)``: submit jobs and batches, follow them, cancel them."""

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
        _raise_for(response)
        return response.json()

    @staticmethod
    def _idempotency(key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": key} if key else {}

    def submit(
        self,
        request: JobRequest | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobView:
        """Queue a job from a ``JobRequest`` or its fields (``prompt=...``)."""
        body = (request or JobRequest.model_validate(fields)).model_dump(
            mode="json", exclude_none=True
        )
        data = self._call("POST", "/v1/jobs", json=body, headers=self._idempotency(idempotency_key))
        return JobView.model_validate(data)

    def get(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def jobs(
        self, *, status: JobStatus | str | None = None, limit: int = 20, cursor: int = 0
    ) -> JobPage:
        params: dict[str, Any] = {"limit": limit, "cursor": cursor}
        if status is not None:
            params["status"] = str(status)
        return JobPage.model_validate(self._call("GET", "/v1/jobs", params=params))

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def redeliver(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/webhook/redeliver"))

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[Event]:
        """The job's events as they happen, ending with its terminal event."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        with connect_sse(
            self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
        ) as source:
            if source.response.is_error:
                source.response.read()
                _raise_for(source.response)
            for sse in source.iter_sse():
                event = Event.model_validate_json(sse.data)
                yield event
                if event.type in TERMINAL_EVENTS:
                    return

    def wait(self, job_id: str, timeout: float = 600.0) -> JobView:
        """The job once it has ended; polls with a growing interval."""
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            job = self.get(job_id)
            if job.status.terminal:
                return job
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {job_id} still {job.status.value} after {timeout:.0f}s")
            time.sleep(interval)
            interval = min(interval * 2, 1.0)

    def batch(self, requests: list[JobRequest], *, idempotency_key: str | None = None) -> BatchView:
        body = {"jobs": [r.model_dump(mode="json", exclude_none=True) for r in requests]}
        data = self._call(
            "POST", "/v1/batches", json=body, headers=self._idempotency(idempotency_key)
        )
        return BatchView.model_validate(data)

    def get_batch(self, batch_id: str) -> BatchView:
        return BatchView.model_validate(self._call("GET", f"/v1/batches/{batch_id}"))

    def account(self) -> Account:
        return Account.model_validate(self._call("GET", "/v1/account"))

    def tiers(self) -> list[TierView]:
        return TierList.model_validate(self._call("GET", "/v1/tiers")).tiers

    def download(self, url: str) -> bytes:
        """An image's bytes from its presigned URL (no API key is sent there)."""
        response = httpx.get(url, timeout=self.http.timeout)
        response.raise_for_status()
        return response.content
