"""Bad input across the Hotpot endpoints and /v1: each answers 4xx with a clear message,
creates no job, takes no credit, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from common.apikeys import KeyStore
from common.redis_keys import key_jobs_key

HOTPOT = "/stable-diffusion-normal"
OK = {"inputText": "a fox"}

# (method, path, how to send, body, status, message fragment)
CASES: list[tuple[str, str, str, Any, int, str]] = [
    ("POST", HOTPOT, "form", {}, 400, "inputText: is required"),
    ("POST", HOTPOT, "form", {"inputText": ""}, 400, "inputText: is required"),
    ("POST", HOTPOT, "form", {"inputText": "x" * 2001}, 400, "at most 2000 characters"),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "guidanceScale": "ten"},
        400,
        "guidanceScale: Input should be a valid number",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "guidanceScale": "-1"},
        400,
        "guidanceScale: Input should be greater than or equal to 0",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "guidanceScale": "31"},
        400,
        "guidanceScale: Input should be less than or equal to 30",
    ),
    ("POST", HOTPOT, "form", {**OK, "guidanceScale": "nan"}, 400, "guidanceScale"),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "seed": "-5"},
        400,
        "seed: Input should be greater than or equal to 0",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "seed": "4294967296"},
        400,
        "seed: Input should be less than or equal to 4294967295",
    ),
    ("POST", HOTPOT, "form", {**OK, "seed": "1.5"}, 400, "seed: Input should be a valid integer"),
    ("POST", HOTPOT, "form", {**OK, "width": "100"}, 400, "width: must be a multiple of 8"),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "height": "32"},
        400,
        "height: Input should be greater than or equal to 64",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "width": "8192", "height": "64"},
        400,
        "width must be at most 1536 on tier normal",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "width": "2048", "height": "64"},
        400,
        "width must be at most 1536 on tier normal",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "steps": "0"},
        400,
        "steps: Input should be greater than or equal to 1",
    ),
    ("POST", HOTPOT, "form", {**OK, "steps": "51"}, 400, "steps must be at most 50 on tier normal"),
    # Over the schema's cap too: still the tier's limit, under Hotpot's field names.
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "steps": "500"},
        400,
        "steps must be at most 50 on tier normal",
    ),
    (
        "POST",
        "/stable-diffusion-budget",
        "form",
        {**OK, "height": "4104", "width": "64"},
        400,
        "height must be at most 1024 on tier budget",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "steps": "many"},
        400,
        "steps: Input should be a valid integer",
    ),
    (
        "POST",
        HOTPOT,
        "form",
        {**OK, "outputFormat": "gif"},
        400,
        "outputFormat: must be one of jpeg, png, webp",
    ),
    ("POST", HOTPOT, "json", OK, 400, "multipart/form-data"),
    ("POST", HOTPOT, "raw", b"\x00\xff garbage", 400, "multipart/form-data"),
    (
        "POST",
        "/stable-diffusion-ultra",
        "form",
        OK,
        404,
        "no such endpoint: POST /stable-diffusion-ultra",
    ),
    ("GET", HOTPOT, "none", None, 405, "method GET is not allowed"),
    ("POST", "/v1/jobs", "json", {}, 400, "prompt: Field required"),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": ""},
        400,
        "prompt: String should have at least 1 character",
    ),
    ("POST", "/v1/jobs", "json", {"prompt": 5}, 400, "prompt: Input should be a valid string"),
    ("POST", "/v1/jobs", "json", {"prompt": "x", "tier": "gold"}, 400, "unknown tier 'gold'"),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "num_images": 0},
        400,
        "num_images: Input should be greater than or equal to 1",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "num_images": 5},
        400,
        "num_images must be at most 4 on tier normal",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "tier": "budget", "steps": 500},
        400,
        "steps must be at most 30 on tier budget",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "num_images": 9},
        400,
        "num_images must be at most 4 on tier normal",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "tier": "gold", "steps": 500},
        400,
        "steps: Input should be less than or equal to 200",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "priority": 10},
        400,
        "priority: Input should be less than or equal to 9",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "output_format": "bmp"},
        400,
        "output_format: Input should be 'jpeg', 'png' or 'webp'",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "nsfw": True},
        400,
        "nsfw: Extra inputs are not permitted",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "metadata": "tag"},
        400,
        "metadata: Input should be a valid dictionary",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "allow_remote": "perhaps"},
        400,
        "allow_remote: Input should be a valid boolean",
    ),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "webhook_url": "http://10.1.2.3/h"},
        400,
        "webhook_url: 10.1.2.3 is a private address",
    ),
    ("POST", "/v1/jobs", "json", {"prompt": "x", "webhook_url": "not a url"}, 400, "webhook_url: "),
    (
        "POST",
        "/v1/jobs",
        "json",
        {"prompt": "x", "webhook_url": "http://127.0.0.1/h", "webhook_events": ["job.boom"]},
        400,
        "unknown events",
    ),
    ("POST", "/v1/jobs", "raw", b"{not json", 400, "JSON decode error"),
    ("POST", "/v1/jobs", "json", [1, 2], 400, "Input should be a valid dictionary"),
    ("POST", "/v1/batches", "json", {"jobs": []}, 400, "jobs: List should have at least 1 item"),
    (
        "POST",
        "/v1/batches",
        "json",
        {"jobs": [{"prompt": "ok"}, {"prompt": ""}]},
        400,
        "jobs.1.prompt",
    ),
    (
        "POST",
        "/v1/batches",
        "json",
        {"jobs": [{"prompt": "ok"}, {"prompt": "x", "tier": "budget", "steps": 201}]},
        400,
        "jobs.1: steps must be at most 30 on tier budget",
    ),
    (
        "POST",
        "/v1/batches",
        "json",
        {"jobs": [{"prompt": "x"}] * 501},
        400,
        "List should have at most 500 items",
    ),
    (
        "GET",
        "/v1/jobs?limit=0",
        "none",
        None,
        400,
        "limit: Input should be greater than or equal to 1",
    ),
    ("GET", "/v1/jobs?status=lost", "none", None, 400, "status: Input should be"),
    ("GET", "/v1/jobs/job_nope", "none", None, 404, "no job job_nope"),
    ("POST", "/v1/jobs/job_nope/cancel", "none", None, 404, "no job job_nope"),
    ("GET", "/v1/batches/batch_nope", "none", None, 404, "no batch batch_nope"),
]


@pytest.fixture(scope="module")
def victim(keys: KeyStore) -> tuple[str, str]:
    raw, record = keys.create(50, name="bad input")
    return raw, record.id


@pytest.mark.parametrize(("method", "path", "kind", "body", "status", "fragment"), CASES)
def test_bad_request(
    api_url: str, keys: KeyStore, rclient: Any, victim: tuple[str, str],
    method: str, path: str, kind: str, body: Any, status: int, fragment: str,
) -> None:  # fmt: skip
    raw, key_id = victim
    send: dict[str, Any] = {}
    if kind == "form":
        send["files"] = {name: (None, value) for name, value in body.items()} or {"x": (None, "")}
    elif kind == "json":
        send["json"] = body
    elif kind == "raw":
        send["content"] = body
        send["headers"] = {"content-type": "application/json"}
    response = httpx.request(
        method,
        api_url + path,
        headers={"Authorization": raw, **send.pop("headers", {})},
        timeout=30,
        **send,
    )
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["code"] == status and fragment in payload["message"], payload
    assert keys.credits(key_id) == 50
    assert rclient.zcard(key_jobs_key(key_id)) == 0


def test_the_server_still_serves(api_url: str, new_key: Callable[..., str]) -> None:
    assert len(CASES) >= 40
    response = httpx.post(
        f"{api_url}/stable-diffusion-budget",
        headers={"Authorization": new_key()},
        files={"inputText": (None, "after the storm"), "steps": (None, "1")},
        timeout=60,
    )
    assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"
