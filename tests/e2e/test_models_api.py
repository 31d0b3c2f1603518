"""Models beyond a tier's default, "available upon request": an entitled key's sd15 job runs
on the sd15 worker; any other key is refused 403 and charged nothing."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.api_calls import credits, get, own_jobs, wait

Key = Callable[..., str]


@pytest.fixture(scope="module")
def sd15(sd15_worker: subprocess.Popen[bytes]) -> None:
    """The sd15 queues of budget and normal have a worker."""


def submit(url: str, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/jobs", json={"prompt": "a lighthouse", **body}, headers={"Authorization": key}
    )


def test_an_entitled_key_gets_its_sd15_job(api_url: str, new_key: Key, sd15: None) -> None:
    key = new_key(10, models=["sd15"])
    response = submit(api_url, key, tier="normal", model="sd15", width=64, height=64, steps=2)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["model_id"] == "sd15" and job["lane"] == "normal.sd15"
    assert job["credits_left"] == 8
    done = wait(api_url, key, job["id"])
    assert done["status"] == "succeeded", done
    assert done["model_id"] == "sd15"
    image = done["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    blob = httpx.get(image["url"], timeout=30)
    with Image.open(io.BytesIO(blob.content)) as picture:
        assert picture.size == (64, 64)


def test_model_on_the_stable_diffusion_endpoint(api_url: str, new_key: Key, sd15: None) -> None:
    key = new_key(10, models=["sd15"])
    response = httpx.post(
        f"{api_url}/stable-diffusion-budget",
        files={
            "inputText": (None, "a lighthouse"),
            "model": (None, "sd15"),
            "width": (None, "64"),
            "height": (None, "64"),
            "steps": (None, "2"),
        },
        headers={"Authorization": key},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-API-Credits-Left"] == "9"
    job = get(api_url, f"/v1/jobs/{response.headers['X-Job-Id']}", key).json()
    assert job["model_id"] == "sd15" and job["lane"] == "budget.sd15"


def test_a_key_not_entitled_is_refused_and_charged_nothing(api_url: str, new_key: Key) -> None:
    key = new_key(10, models=["sd21"])
    response = submit(api_url, key, tier="normal", model="sd15")
    assert response.status_code == 403, response.text
    assert response.json() == {
        "code": 403,
        "message": "model sd15 is available upon request: this key is not entitled to it "
        "(tier normal serves sdxl to every key)",
        "model": "sd15",
    }
    response = httpx.post(
        f"{api_url}/stable-diffusion-normal",
        files={"inputText": (None, "a lighthouse"), "model": (None, "sd15")},
        headers={"Authorization": key},
        timeout=30,
    )
    assert response.status_code == 403
    assert response.json()["message"].startswith("model sd15 is available upon request")
    # A model the tier does not serve is a bad request, entitled or not.
    response = submit(api_url, key, tier="premium", model="sd21")
    assert response.status_code == 400
    assert response.json()["message"] == (
        "tier premium does not serve model 'sd21'; it serves: sdxl"
    )
    assert credits(api_url, key) == 10 and own_jobs(api_url, key) == []
