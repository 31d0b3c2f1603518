"""The remote fallback: a client for Hotpot-compatible APIs (Hotpot itself, or another sdq).

It speaks the seed's contract: a multipart POST with ``inputText``, ``guidanceScale`` and
friends, ``Authorization: <key>``, image bytes back with ``X-API-Credits-Left``, errors as
``{"code": N, "message": ...}``. 429 and 5xx are retried with backoff, honouring
``Retry-After``; a circuit breaker stops calling an API that keeps failing.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_before_delay
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential_jitter

from common import hotpot
from common.errors import RemoteApiError
from common.http import retry_after
from common.settings import Settings
from workers.pipeline import Generation, StepCallback

log = logging.getLogger(__name__)


class RetryableRemoteError(RemoteApiError):
    """A 429, a 5xx or a network error: worth another try."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(RemoteApiError):
    message = "the remote API is failing; its circuit breaker is open"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; lets one call through (half-open)
    after ``cooldown`` seconds, and closes again on its success."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self.opened_at is not None and time.monotonic() - self.opened_at < self.cooldown

    def check(self) -> None:
        if self.is_open:
            raise CircuitOpen()

    def success(self) -> None:
        with self._lock:
            self.failures, self.opened_at = 0, None

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.failures >= self.threshold:
                self.opened_at = time.monotonic()


class HotpotClient:
    """One Hotpot-compatible endpoint, with retries and a circuit breaker."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float,
        max_attempts: int,
        retry_base: float,
        breaker: CircuitBreaker,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.max_attempts = max_attempts
        self.breaker = breaker
        self._backoff = wait_exponential_jitter(multiplier=retry_base, max=60, jitter=retry_base)
        self.timeout = timeout
        self.http = httpx.Client(timeout=timeout, follow_redirects=False)
        self.credits_left: int | None = None

    def _wait(self, state: Any) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableRemoteError) and error.retry_after is not None:
            return min(error.retry_after, 300.0)
        return float(self._backoff(state))

    def generate(self, fields: dict[str, str], deadline: float | None = None) -> bytes:
        """The image bytes for one request; raises ``RemoteApiError`` when it cannot, or
        when the ``deadline`` (``time.monotonic()``) would pass before the next attempt."""
        self.breaker.check()
        stop: stop_base = stop_after_attempt(self.max_attempts)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteApiError("the remote API's time for this job ran out")
            stop = stop | stop_before_delay(left)
        retrying = Retrying(
            stop=stop,
            wait=self._wait,
            retry=retry_if_exception_type(RetryableRemoteError),
            reraise=True,
        )
        try:
            body = retrying(self._call, fields, deadline)
        except RetryableRemoteError:
            self.breaker.failure()
            raise
        self.breaker.success()
        return body

    def _call(self, fields: dict[str, str], deadline: float | None = None) -> bytes:
        files = {name: (None, value) for name, value in fields.items()}
        timeout = self.http.timeout
        if deadline is not None:
            timeout = httpx.Timeout(max(0.1, min(self.timeout, deadline - time.monotonic())))
        try:
            response = self.http.post(
                self.url, headers={"Authorization": self.api_key}, files=files, timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise RetryableRemoteError(f"remote API unreachable: {exc}") from exc
        if response.status_code == 200:
            credits = response.headers.get(hotpot.CREDITS_HEADER)
            self.credits_left = int(credits) if credits and credits.isdigit() else None
            return response.content
        reason = hotpot.error_message(response.content)
        message = f"remote API answered {response.status_code}: {reason}"
        if response.status_code == 429 or response.status_code >= 500:
            log.warning("%s; retrying", message)
            raise RetryableRemoteError(message, retry_after(response.headers.get("retry-after")))
        raise RemoteApiError(message)


class RemoteRunner:
    """Generation on a tier's remote API, shaped like the local runner."""

    backend = "remote"
    load_error: str | None = None

    def __init__(self, client: HotpotClient, deadline_seconds: float | None = None) -> None:
        self.client = client
        #: The whole of one job's remote path, its images, retries and waits together.
        self.deadline_seconds = deadline_seconds

    @property
    def model_name(self) -> str:
        return f"remote:{urlsplit(self.client.url).netloc}"

    def generate(
        self, generation: Generation, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        images: list[Image.Image] = []
        deadline = None
        if self.deadline_seconds is not None:
            deadline = time.monotonic() + self.deadline_seconds
        for seed in generation.seeds:
            fields = hotpot.form(
                prompt=generation.prompt,
                guidance_scale=generation.guidance_scale,
                seed=seed,
                steps=generation.steps,
                output_format="png",  # lossless: the worker encodes the job's format
                negative_prompt=generation.negative_prompt,
            )
            if generation.width and generation.height:
                fields |= hotpot.form(width=generation.width, height=generation.height)
            body = self.client.generate(fields, deadline)
            try:
                image = Image.open(io.BytesIO(body))
                image.load()
            except OSError as exc:
                raise RemoteApiError(f"the remote API sent no image: {exc}") from exc
            images.append(image)
            if on_step is not None:
                on_step(generation.steps, generation.steps)
        return images


class RemoteRunners:
    """One runner per tier URL, each with its own breaker, made on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runners: dict[str, RemoteRunner] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> RemoteRunner:
        with self._lock:
            if url not in self._runners:
                s = self.settings
                key = s.remote_api_key.get_secret_value() if s.remote_api_key else ""
                breaker = CircuitBreaker(s.circuit_failures, s.circuit_cooldown_seconds)
                client = HotpotClient(
                    url,
                    key,
                    timeout=s.remote_timeout_seconds,
                    max_attempts=s.remote_max_attempts,
                    retry_base=s.remote_retry_base_seconds,
                    breaker=breaker,
                )
                self._runners[url] = RemoteRunner(client, s.remote_deadline_seconds)
            return self._runners[url]

    def close(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                runner.client.http.close()
            self._runners.clear()
