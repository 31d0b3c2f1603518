"""The async JSON API, end to end."""

from __future__ import annotations

import hashlib
import time
import tomllib
from collections.abc import Callable

import httpx

from tests.e2e.api_calls import auth, wait
from tests.support import ROOT

Key = Callable[..., str]


def bearer(key: str) -> dict[str, str]:
    return auth(key, bearer=True)  # these tests send the key as a Bearer token


def test_submit_poll_download(api_url: str, new_key: Key) -> None:
    key = new_key(20)
    body = {"prompt": "a castle", "tier": "premium", "steps": 2, "num_images": 2, "seed": 11}
    response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=bearer(key))
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
        f"{api_url}/v1/jobs", json={"prompt": "x", "steps": 1}, headers=bearer(owner)
    ).json()
    response = httpx.get(f"{api_url}/v1/jobs/{job['id']}", headers=bearer(stranger))
    assert response.status_code == 404
    assert response.json() == {"code": 404, "message": f"no job {job['id']}"}
    assert httpx.get(f"{api_url}/v1/jobs/job_nope", headers=bearer(owner)).status_code == 404


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
        # Over the tier's limit and over the schema's cap: the tier's limit either way.
        (
            {"prompt": "x", "tier": "budget", "steps": 100},
            "steps must be at most 30 on tier budget",
        ),
        (
            {"prompt": "x", "tier": "budget", "steps": 500},
            "steps must be at most 30 on tier budget",
        ),
        ({"prompt": "x", "width": 8192, "height": 64}, "width must be at most 1536 on tier normal"),
        (
            {"prompt": "x", "tier": "premium", "height": 5000, "width": 64},
            "height must be at most 2048 on tier premium",
        ),
        (
            {"prompt": "x", "tier": "budget", "num_images": 9},
            "num_images must be at most 2 on tier budget",
        ),
    ]
    for body, message in cases:
        response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=bearer(key))
        assert response.status_code == 400, body
        assert message in response.json()["message"], response.json()
    account = httpx.get(f"{api_url}/v1/account", headers=bearer(key)).json()
    assert account["credits"] == 10


def test_account(api_url: str, new_key: Key) -> None:
    key = new_key(42)
    response = httpx.get(f"{api_url}/v1/account", headers=bearer(key))
    assert response.status_code == 200
    account = response.json()
    assert account["credits"] == 42 and account["id"].startswith("key_")
    assert account["webhook_secret"].startswith("whsec_")
    assert httpx.get(f"{api_url}/v1/account").status_code == 401


def test_tiers(api_url: str, new_key: Key) -> None:
    response = httpx.get(f"{api_url}/v1/tiers", headers=bearer(new_key()))
    assert response.status_code == 200, response.text
    builtin = tomllib.loads((ROOT / "common" / "tiers.toml").read_text())["tiers"]
    fields = ("description", "default_steps", "max_steps", "max_side", "max_images", "price")
    expected = [
        {
            "name": name,
            **{field: spec[field] for field in fields},
            "scheduler": spec["scheduler"],
            "default_model": spec.get("default_model", "sdxl"),
            "models": spec.get("models", [spec.get("default_model", "sdxl")]),
        }
        for name, spec in builtin.items()
    ]
    assert response.json() == {"tiers": expected}
    budget = response.json()["tiers"][0]
    assert (budget["name"], budget["max_steps"], budget["price"]) == ("budget", 30, 1)
    # What a tier offers is what it accepts: one step more is refused with that limit.
    over = {"prompt": "x", "tier": "budget", "steps": budget["max_steps"] + 1}
    refused = httpx.post(f"{api_url}/v1/jobs", json=over, headers=bearer(new_key()))
    assert refused.json() == {"code": 400, "message": "steps must be at most 30 on tier budget"}
    assert httpx.get(f"{api_url}/v1/tiers").status_code == 401
    assert httpx.get(f"{api_url}/v1/tiers", headers=bearer("sdq_nope")).status_code == 403


def test_health_and_docs(api_url: str) -> None:
    assert httpx.get(f"{api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api_url}/readyz").json()
    assert ready == {"ready": True}  # the checks' details are the admin token's to see
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
