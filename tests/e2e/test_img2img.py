"""Image-to-image on `/v1/jobs` (`init_image`, base64) and the Stable Diffusion endpoints
(`seedImage`): the input is checked at the edge, stored under its job as a clean PNG before
the charge, and the output takes its size. Every refusal costs nothing and leaves no object
behind."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from common.settings import Settings
from common.storage import S3Storage
from tests.e2e.api_calls import (
    assert_refused_free,
    b64,
    credits,
    own_jobs,
    picture,
    stored_inputs,
    wait,
)

Key = Callable[..., str]
MAX_BYTES = 8 * 1024 * 1024  # SDQ_MAX_INIT_IMAGE_BYTES's default
MAX_BODY = 12 * 1024 * 1024  # SDQ_MAX_IMAGE_BODY_BYTES's default


def submit(
    url: str, key: str, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/jobs",
        json={"prompt": "a harbour at dawn", "tier": "budget", **body},
        headers={"Authorization": key, **(headers or {})},
        timeout=60,
    )


def photo_with_metadata(width: int, height: int) -> bytes:
    """A JPEG carrying EXIF (a camera model and a GPS tag), as phones write them."""
    exif = Image.Exif()
    exif[0x0110] = "SecretCam 3000"  # Model
    exif[0x8825] = {1: "N"}  # GPSInfo
    return picture(width, height, "JPEG", exif=exif.tobytes())


def test_init_image_on_v1_jobs(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings
) -> None:
    key = new_key(10)
    sent = photo_with_metadata(120, 84)
    response = submit(api_url, key, init_image=b64(sent), strength=0.5, steps=4)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["credits_left"] == 9
    assert job["init_image_key"] == f"{settings.s3_prefix}/{job['id']}/input.png"
    assert job["request"]["init_image"] is None and job["request"]["strength"] == 0.5
    assert (job["request"]["width"], job["request"]["height"]) == (120, 80)
    # Stored before the charge, as a PNG with none of the input's metadata.
    stored = storage.get(job["init_image_key"])
    with Image.open(io.BytesIO(stored.body)) as image:
        assert image.format == "PNG" and image.size == (120, 84)
        assert "exif" not in image.info and not image.getexif()
    assert b"SecretCam" not in stored.body
    done = wait(api_url, key, job["id"])
    assert done["status"] == "succeeded", done
    result = done["images"][0]
    assert (result["width"], result["height"]) == (120, 80)
    with Image.open(io.BytesIO(httpx.get(result["url"], timeout=30).content)) as image:
        assert image.size == (120, 80)
    assert credits(api_url, key) == 9


def test_width_and_height_resize_the_input(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    sent = picture(300, 200, "WEBP")
    response = submit(api_url, key, init_image=b64(sent), width=64, height=96, steps=2)
    assert response.status_code == 202, response.text
    done = wait(api_url, key, response.json()["id"])
    assert done["status"] == "succeeded", done
    assert (done["images"][0]["width"], done["images"][0]["height"]) == (64, 96)


def test_seed_image_on_a_stable_diffusion_endpoint(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    response = httpx.post(
        f"{api_url}/stable-diffusion-normal",
        headers={"Authorization": key},
        files={
            "inputText": (None, "a harbour at dawn"),
            "promptStrength": (None, "0.6"),
            "steps": (None, "3"),
            "seedImage": ("seed.jpg", picture(88, 64, "JPEG"), "image/jpeg"),
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-API-Credits-Left"] == "8"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (88, 64)


def test_an_idempotent_retry_stores_and_charges_once(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings
) -> None:
    key = new_key(10)
    before = stored_inputs(storage, settings)
    body = {"init_image": b64(picture(64, 64)), "steps": 2}
    first, second = (
        submit(api_url, key, headers={"Idempotency-Key": "img-1"}, **body) for _ in range(2)
    )
    assert (first.status_code, second.status_code) == (202, 202)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]
    assert credits(api_url, key) == 9
    assert stored_inputs(storage, settings) - before == {first.json()["init_image_key"]}
    other = submit(
        api_url, key, headers={"Idempotency-Key": "img-1"}, init_image=b64(picture(72, 64))
    )
    assert other.status_code == 409
    assert stored_inputs(storage, settings) - before == {first.json()["init_image_key"]}


CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "corrupt",
        {"init_image": b64(b"\x89PNG\r\n\x1a\n" + os.urandom(300))},
        "init_image: not a valid PNG, JPEG or WebP image",
    ),
    (
        "truncated",
        {"init_image": b64(picture(256, 256)[:300])},
        "init_image: not a valid PNG, JPEG or WebP image",
    ),
    (
        "not base64",
        {"init_image": "%%% not base64 %%%"},
        "init_image: must be a PNG, JPEG or WebP image as base64",
    ),
    (
        "oversized",
        {"init_image": b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * MAX_BYTES)},
        f"init_image: at most {MAX_BYTES} bytes (SDQ_MAX_INIT_IMAGE_BYTES)",
    ),
    (
        "strength 1.5",
        {"init_image": b64(picture(64, 64)), "strength": 1.5},
        "strength: Input should be less than or equal to 1",
    ),
    (
        "side over the cap",
        {"init_image": b64(picture(64, 5000))},
        "init_image: at most 4096 pixels a side (SDQ_MAX_INIT_IMAGE_SIDE), this one is 64x5000",
    ),
    (
        "output over the tier",
        {"init_image": b64(picture(1100, 64))},
        "init_image: the output takes the input's size, 1096x64, and tier budget allows at "
        "most 1024 a side; send width and height to resize it",
    ),
    (
        "too small",
        {"init_image": b64(picture(32, 32))},
        "init_image: at least 64 pixels a side, this one is 32x32",
    ),
]


@pytest.mark.parametrize(("body", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_400_and_costs_nothing(
    api_url: str,
    new_key: Key,
    storage: S3Storage,
    settings: Settings,
    body: dict[str, Any],
    message: str,
) -> None:
    key = new_key(10)
    before = stored_inputs(storage, settings)
    response = submit(api_url, key, **body)
    assert_refused_free(api_url, key, response, message, before, storage, settings)


def test_a_batch_takes_no_init_image(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    response = httpx.post(
        f"{api_url}/v1/batches",
        json={"jobs": [{"prompt": "a"}, {"prompt": "b", "init_image": b64(picture(64, 64))}]},
        headers={"Authorization": key},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["message"] == (
        "jobs.1.init_image: image-to-image is not accepted in batches; send each such job to "
        "POST /v1/jobs"
    )
    assert credits(api_url, key) == 10 and own_jobs(api_url, key) == []


@pytest.mark.parametrize("refusal", ["credits", "model"])
def test_a_refused_job_leaves_no_input_behind(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings, refusal: str
) -> None:
    before = stored_inputs(storage, settings)
    if refusal == "credits":
        key = new_key(0)
        response = submit(api_url, key, init_image=b64(picture(64, 64)))
        assert response.status_code == 429
        assert (
            response.json()["message"] == "not enough credits: this request costs 1, the key has 0"
        )
    else:
        key = new_key(10)
        response = submit(api_url, key, init_image=b64(picture(64, 64)), model="sd15")
        assert response.status_code == 403
    assert own_jobs(api_url, key) == []
    assert stored_inputs(storage, settings) == before


def test_a_body_over_the_image_limit_is_413_unread(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    head = json.dumps({"prompt": "x", "init_image": ""}).encode()[:-2] + b'"'
    parts = urlsplit(api_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {key}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
            + head
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(body) == {
        "code": 413,
        "message": f"request body too large: at most {MAX_BODY} bytes here",
    }
    assert credits(api_url, key) == 10
