"""The Hotpot-compatible endpoints, end to end: API under uvicorn, a Celery worker, Valkey, S3."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import requests
from PIL import Image

from common.apikeys import KeyStore
from common.storage import S3Storage
from common.store import JobStore

SEED_PYTHON = """
import requests

# API Key and Endpoint
api_key = '{key}'
api_endpoint = '{url}/stable-diffusion-normal'

# Request Headers and Data
headers = {{'Authorization': api_key}}
data = {{
    'inputText': 'An astronaut riding a horse on Mars',
    'guidanceScale': 10,
}}

# Make API Request
response = requests.post(api_endpoint, headers=headers, files=data)
if response.status_code == 200:
    with open('astronaut_on_mars.jpg', 'wb') as f:
        f.write(response.content)
    print('Image generated and saved.')
else:
    print(f'Error: {{response.status_code}}, message: {{response.text}}')
"""

Key = Callable[..., str]


def post(url: str, key: str | None, tier: str = "normal", **fields: object) -> httpx.Response:
    headers = {"Authorization": key} if key is not None else {}
    data = {name: str(value) for name, value in fields.items()}
    files = {name: (None, value) for name, value in data.items()}
    return httpx.post(
        f"{url}/stable-diffusion-{tier}", headers=headers, files=files or None, timeout=60
    )


def test_the_seed_curl_example(api_url: str, new_key: Key, tmp_path: Path, keys: KeyStore) -> None:
    key = new_key(100)
    result = subprocess.run(
        [
            "curl", "-sS", "-D", "-",
            "-H", f"Authorization: {key}",
            "-F", "inputText=An astronaut riding a horse on Mars",
            "-F", "guidanceScale=10",
            "-o", "astronaut_on_mars.jpg",
            f"{api_url}/stable-diffusion-normal",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout.startswith("HTTP/1.1 200")
    assert "x-api-credits-left: 98" in result.stdout.lower()
    with Image.open(tmp_path / "astronaut_on_mars.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 64)


def test_the_seed_python_example(api_url: str, new_key: Key, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(SEED_PYTHON.format(key=new_key(100), url=api_url))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "Image generated and saved."
    with Image.open(tmp_path / "astronaut_on_mars.jpg") as image:
        assert image.format == "JPEG"


@pytest.mark.parametrize(("tier", "price"), [("budget", 1), ("normal", 2), ("premium", 4)])
def test_every_tier(api_url: str, new_key: Key, tier: str, price: int) -> None:
    response = post(api_url, new_key(10), tier, inputText="a lighthouse", steps=2)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert int(response.headers["x-api-credits-left"]) == 10 - price


def test_the_image_is_the_object_in_the_bucket(
    api_url: str, new_key: Key, storage: S3Storage, store: JobStore
) -> None:
    response = post(api_url, new_key(), "budget", inputText="a fox", steps=2, seed=77)
    job = store.get(response.headers["x-job-id"])
    assert job.status.value == "succeeded" and job.seed == 77 and job.steps == 2
    blob = storage.get(f"images/{job.id}/0.jpg")
    assert blob.body == response.content
    assert hashlib.sha256(blob.body).hexdigest() == job.images[0].sha256
    assert blob.metadata["tier"] == "budget" and blob.metadata["seed"] == "77"
    assert blob.metadata["model"] == "tiny-sdxl" and blob.metadata["backend"] == "local"


def test_a_seed_gives_the_same_image(api_url: str, new_key: Key) -> None:
    key = new_key()
    first = post(api_url, key, "budget", inputText="a fox", steps=2, seed=5)
    second = post(api_url, key, "budget", inputText="a fox", steps=2, seed=5)
    other = post(api_url, key, "budget", inputText="a fox", steps=2, seed=6)
    assert first.headers["x-seed"] == "5"
    assert first.content == second.content != other.content


def test_options_reach_the_pipeline(api_url: str, new_key: Key) -> None:
    response = post(
        api_url, new_key(), "budget", inputText="a fox", steps=2, width=96, height=64,
        outputFormat="png", negativePrompt="blurry",
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)


def test_bearer_and_urlencoded(api_url: str, new_key: Key) -> None:
    response = httpx.post(
        f"{api_url}/stable-diffusion-budget",
        headers={"Authorization": f"Bearer {new_key()}"},
        data={"inputText": "a fox", "steps": "2"},
        timeout=60,
    )
    assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guidanceScale": 10}, "inputText: is required"),
        (
            {"inputText": "x", "guidanceScale": "loud"},
            "guidanceScale: Input should be a valid number",
        ),
        ({"inputText": "x", "width": 100}, "width: must be a multiple of 8"),
        ({"inputText": "x", "steps": 51}, "steps must be at most 50 on tier normal"),
        ({"inputText": "x", "steps": 500}, "steps must be at most 50 on tier normal"),
        ({"inputText": "x", "width": 8192}, "width must be at most 1536 on tier normal"),
        ({"inputText": "x", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"inputText": "x", "outputFormat": "bmp"}, "outputFormat: must be one of jpeg, png, webp"),
        ({"inputText": "x" * 2001}, "inputText: String should have at most 2000 characters"),
    ],
)
def test_bad_parameters_are_400_and_free(
    api_url: str, new_key: Key, keys: KeyStore, fields: dict[str, object], message: str
) -> None:
    key = new_key(10)
    response = post(api_url, key, **fields)
    assert response.status_code == 400
    assert response.json()["code"] == 400
    assert response.json()["message"].startswith(message)
    assert keys.authenticate(key).credits == 10


def test_a_json_body_is_refused(api_url: str, new_key: Key) -> None:
    response = httpx.post(
        f"{api_url}/stable-diffusion-normal",
        headers={"Authorization": new_key()},
        json={"inputText": "x"},
    )
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["message"]


def test_no_key_is_401(api_url: str) -> None:
    response = post(api_url, None, inputText="x")
    assert response.status_code == 401
    assert response.json() == {
        "code": 401,
        "message": "missing API key: send it in the Authorization header",
    }


def test_an_unknown_key_is_403(api_url: str) -> None:
    response = post(api_url, "sdq_made-up", inputText="x")
    assert response.status_code == 403
    assert response.json() == {"code": 403, "message": "invalid API key"}


def test_an_unknown_path_is_404(api_url: str, new_key: Key) -> None:
    response = post(api_url, new_key(), "ultra", inputText="x")
    assert response.status_code == 404
    assert response.json() == {
        "code": 404,
        "message": "no such endpoint: POST /stable-diffusion-ultra",
    }


def test_no_credits_is_429_and_charges_nothing(api_url: str, new_key: Key, keys: KeyStore) -> None:
    key = new_key(3)
    response = post(api_url, key, "premium", inputText="x")
    assert response.status_code == 429
    assert response.json() == {
        "code": 429,
        "message": "not enough credits: this request costs 4, the key has 3",
    }
    assert keys.authenticate(key).credits == 3
    ok = post(api_url, key, "normal", inputText="x", steps=2)
    assert ok.status_code == 200 and ok.headers["x-api-credits-left"] == "1"


def test_requests_library_gets_json_errors(api_url: str) -> None:
    response = requests.post(
        f"{api_url}/stable-diffusion-normal", files={"inputText": "x"}, timeout=30
    )
    assert response.status_code == 401 and response.json()["code"] == 401
