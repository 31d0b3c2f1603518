"""The async JSON API, end to end."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import httpx

Key = Callable[..., str]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait(api_url: str, key: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(key)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def test_submit_poll_download(api_url: str, new_key: Key) -> None:
    key = new_key(20)
    body = {"prompt": "a castle", "tier": "premium", "steps": 2, "num_images": 2, "seed": 11}
    response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["cost"] == 8 and job["credits_left"] == 12
    assert "key_id" not in job
    done = wait(api_url, key, job["id"])
    assert done["status"] == "succeeded" and done["backend"] == "local"
    assert [image["seed"] for image in done["images"]] == [11, 12]
    for image in done["images"]:
        content = httpx.get(image["url"]).content
        assert hashlib.sha256(content).hexdigest() == image["sha256"]
        assert content[:2] == b"\xff\xd8"


def test_another_keys_job_is_404(api_url: str, new_key: Key) -> None:
    owner, stranger = new_key(), new_key()
    job = httpx.post(
        f"{api_url}/v1/jobs", json={"prompt": "x", "steps": 1}, headers=auth(owner)
    ).json()
    response = httpx.get(f"{api_url}/v1/jobs/{job['id']}", headers=auth(stranger))
    assert response.status_code == 404
    assert response.json() == {"code": 404, "message": f"no job {job['id']}"}
    assert httpx.get(f"{api_url}/v1/jobs/job_nope", headers=auth(owner)).status_code == 404


def test_bad_bodies_are_400(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    cases = [
        (
            {"prompt": "x", "num_images": 0},
            "num_images: Input should be greater than or equal to 1",
        ),
        ({"prompt": "x", "tier": "gold"}, "unknown tier 'gold'"),
        ({"prompt": "x", "width": 4000, "height": 64}, "width must be at most 1536 on tier normal"),
        ({}, "prompt: Field required"),
    ]
    for body, message in cases:
        response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=auth(key))
        assert response.status_code == 400, body
        assert message in response.json()["message"], response.json()
    account = httpx.get(f"{api_url}/v1/account", headers=auth(key)).json()
    assert account["credits"] == 10


def test_account(api_url: str, new_key: Key) -> None:
    key = new_key(42)
    response = httpx.get(f"{api_url}/v1/account", headers=auth(key))
    assert response.status_code == 200
    account = response.json()
    assert account["credits"] == 42 and account["id"].startswith("key_")
    assert account["webhook_secret"].startswith("whsec_")
    assert httpx.get(f"{api_url}/v1/account").status_code == 401


def test_health_and_docs(api_url: str) -> None:
    assert httpx.get(f"{api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api_url}/readyz").json()
    assert ready == {"ready": True, "checks": {"store": "ok", "broker": "ok", "storage": "ok"}}
    spec = httpx.get(f"{api_url}/openapi.json").json()
    for path in ("/stable-diffusion-budget", "/stable-diffusion-premium", "/v1/jobs"):
        assert path in spec["paths"]
    body = spec["paths"]["/stable-diffusion-normal"]["post"]["requestBody"]["content"]
    assert "inputText" in body["multipart/form-data"]["schema"]["properties"]
    assert httpx.get(f"{api_url}/docs").status_code == 200


def test_idle_connections_outlive_uvicorns_default(api_url: str) -> None:
    # A load balancer, or a pooled client, reuses a connection after a pause; uvicorn's
    # default closed it after 5 s and the reuse met a reset (SDQ_API_KEEP_ALIVE_SECONDS).
    limits = httpx.Limits(keepalive_expiry=30)  # httpx's own default drops it after 5 s
    with httpx.Client(base_url=api_url, limits=limits) as client:
        first = client.get("/healthz").extensions["network_stream"].get_extra_info("client_addr")
        time.sleep(6)
        again = client.get("/healthz")
        assert again.status_code == 200
        # The same connection answered: the server had not closed it.
        assert again.extensions["network_stream"].get_extra_info("client_addr") == first
