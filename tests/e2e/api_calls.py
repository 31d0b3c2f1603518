"""Calls the API tests share: the key header, a key's credits and jobs, a job followed to its
end, input images made with Pillow, and the inputs stored in S3."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
from PIL import Image

from common.settings import Settings
from common.storage import S3Storage

TERMINAL = ("event: job.succeeded", "event: job.failed", "event: job.canceled")


def auth(key: str, *, bearer: bool = False) -> dict[str, str]:
    """The Authorization header: the raw key, as Hotpot's clients send it, or ``Bearer``."""
    return {"Authorization": f"Bearer {key}" if bearer else key}


def get(url: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": key} if key is not None else {}
    return httpx.get(f"{url}{path}", headers=headers, timeout=30)


def credits(url: str, key: str) -> int:
    value: int = get(url, "/v1/account", key).json()["credits"]
    return value


def own_jobs(url: str, key: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = get(url, "/v1/jobs", key).json()["jobs"]
    return jobs


def wait(url: str, key: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The job once it has ended, followed on its event stream."""
    with httpx.stream(
        "GET", f"{url}/v1/jobs/{job_id}/events", headers={"Authorization": key}, timeout=timeout
    ) as events:
        for line in events.iter_lines():
            if line.startswith(TERMINAL):
                break
    job: dict[str, Any] = get(url, f"/v1/jobs/{job_id}", key).json()
    return job


def picture(width: int, height: int, fmt: str = "PNG", **options: Any) -> bytes:
    """An image of that size: a gradient, so it is not trivially compressible."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stored_inputs(storage: S3Storage, settings: Settings) -> set[str]:
    """Every input image in the bucket (``<prefix>/<job id>/input.png``)."""
    found: set[str] = set()
    pages = storage.client.get_paginator("list_objects_v2").paginate(
        Bucket=storage.bucket, Prefix=settings.s3_prefix.strip("/") + "/"
    )
    for page in pages:
        found.update(o["Key"] for o in page.get("Contents", []) if o["Key"].endswith("/input.png"))
    return found


def assert_refused_free(
    url: str,
    key: str,
    response: httpx.Response,
    message: str,
    inputs_before: set[str],
    storage: S3Storage,
    settings: Settings,
) -> None:
    """A 400 with that message that charged the key (of 10 credits) nothing, made no job and
    stored no input image."""
    assert response.status_code == 400, response.text
    assert response.json() == {"code": 400, "message": message}
    assert credits(url, key) == 10 and own_jobs(url, key) == []
    assert stored_inputs(storage, settings) == inputs_before
