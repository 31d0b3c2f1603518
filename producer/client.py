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

import base64
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from pydantic import ValidationError

from common.errors import InvalidRequest, JobTimeout, SdqError
from common.http import retry_after
from common.job import TERMINAL_EVENTS, JobRequest, JobStatus
from producer.schemas import Account, BatchView, Event, JobPage, JobView, TierList, TierView


class ApiError(SdqError):
    """An error answer of the API: its HTTP status, message and extra fields, and the
    seconds its ``Retry-After`` asked to wait (``None`` when it sent none)."""

    def __init__(
        self, status_code: int, message: str, *, retry_after: float | None = None, **details: object
    ) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
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


class InvalidUrlError(SdqError, ValueError):
    """The API's URL is not an ``http://`` or ``https://`` URL with a host."""


class UnreachableError(SdqError, ConnectionError):
    """No answer at all: connection refused, an unknown host, a dropped connection."""


class ApiTimeoutError(UnreachableError, TimeoutError):
    """The server took longer than the client's timeout to connect or answer."""


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
    body: dict[str, Any] = {}
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        reserved = ("message", "code", "status_code", "retry_after")
        body = {k: v for k, v in data.items() if k not in reserved}
        message = data["message"]
    elif "html" in response.headers.get("content-type", ""):
        message = response.reason_phrase  # a proxy's error page, say: its markup tells nothing
    else:
        message = " ".join(response.text.split())[:200] or response.reason_phrase
    cls = _ERRORS.get(
        response.status_code, ServerError if response.status_code >= 500 else ApiError
    )
    raise cls(
        response.status_code,
        message,
        retry_after=retry_after(response.headers.get("retry-after")),
        **body,
    )


def _base_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url.rstrip("/"))
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidUrlError(
            f"invalid API URL {url!r}: use http://host:port, for example http://127.0.0.1:8000"
        )
    return parsed


def _reason(exc: Exception) -> str:
    """``[Errno 111] Connection refused`` as ``connection refused``."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).strip().rstrip(".")
    return (text[:1].lower() + text[1:]) if text else type(exc).__name__


@contextmanager
def _reaching(where: str, timeout: float | None) -> Iterator[None]:
    """httpx's transport errors as sdq's, each one sentence naming what was not reached."""
    try:
        yield
    except httpx.TimeoutException:
        raise ApiTimeoutError(f"{where} did not answer within {timeout:g} s") from None
    except httpx.InvalidURL as exc:
        raise InvalidUrlError(f"{where}: {_reason(exc)}") from None
    except httpx.TransportError as exc:
        raise UnreachableError(f"cannot reach {where}: {_reason(exc)}") from None


def _field_problems(exc: ValidationError) -> dict[str, str]:
    """Pydantic's errors as ``{field: "field: what is wrong"}``, one per field."""
    problems: dict[str, str] = {}
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.setdefault(field, f"{field}: {message}" if field else message)
    return problems


def _tier_problems(fields: Mapping[str, Any], tiers: Mapping[str, TierView]) -> dict[str, str]:
    """What ``fields`` ask beyond their tier's limits, worded as the API words it."""
    name = fields.get("tier", JobRequest.model_fields["tier"].default)
    if not isinstance(name, str):
        return {}  # the schema says what is wrong with it
    tier = tiers.get(name.strip())
    if tier is None:
        return {"tier": f"unknown tier {name!r}; choose one of: {', '.join(tiers)}"}
    limits = {
        "steps": tier.max_steps,
        "width": tier.max_side,
        "height": tier.max_side,
        "num_images": tier.max_images,
    }
    problems = {}
    for field, most in limits.items():
        value = fields.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > most:
            problems[field] = f"{field} must be at most {most} on tier {tier.name}"
    return problems


class Client:
    """``Client(url, key)``: submit jobs and batches, follow them, cancel them."""

    def __init__(self, url: str, key: str, *, timeout: float = 30.0) -> None:
        self.url = str(_base_url(url))
        self.timeout = timeout
        self._where = f"the sdq API at {self.url}"
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )
        self._tiers: dict[str, TierView] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with _reaching(self._where, self.timeout):
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
        """Queue a job from a ``JobRequest`` or its fields (``prompt=...``, ``style="anime"``,
        ``model="sd15"``; ``init_image`` may be the image's bytes or a path, for
        image-to-image)."""
        image = fields.get("init_image")
        if isinstance(image, Path):
            image = image.read_bytes()
        if isinstance(image, bytes):
            fields["init_image"] = base64.b64encode(image).decode()
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
        with (
            _reaching(self._where, self.timeout),
            connect_sse(
                self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
            ) as source,
        ):
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

    def check(self, fields: Mapping[str, Any]) -> JobRequest:
        """``fields`` as a ``JobRequest``, checked against this deployment's tiers (read
        once), so that a limit is the tier's ("steps must be at most 30 on tier budget"),
        not the schema's cap. Raises ``InvalidRequest`` naming every bad field. The API
        checks again and has the last word."""
        if self._tiers is None:
            try:
                self._tiers = {tier.name: tier for tier in self.tiers()}
            except NotFoundError:  # an API older than GET /v1/tiers: it alone judges
                self._tiers = {}
        problems = _tier_problems(fields, self._tiers) if self._tiers else {}
        try:
            request = JobRequest.model_validate(fields)
        except ValidationError as exc:
            problems = _field_problems(exc) | problems
        if problems:
            raise InvalidRequest("; ".join(problems.values()))
        return request

    def download(self, url: str) -> bytes:
        """An image's bytes from its presigned URL (no API key is sent there)."""
        host = httpx.URL(url).host
        with _reaching(f"the image store at {host}", self.timeout):
            response = httpx.get(url, timeout=self.http.timeout)
        if response.is_error:
            raise ApiError(response.status_code, f"downloading an image from {host} failed")
        return response.content
