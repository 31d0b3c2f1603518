"""`POST /make-art`, drop-in for Hotpot's Image Generator API: a form in (multipart or
url-encoded, fields as file parts too), image bytes out, on the art tier at its price; a
`seedImage` makes it image-to-image. A bad form is a 400 that costs nothing and stores
nothing."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from PIL import Image

from common.settings import Settings
from common.storage import S3Storage
from common.styles import load_styles
from tests.e2e.api_calls import (
    assert_refused_free,
    b64,
    credits,
    get,
    own_jobs,
    picture,
    stored_inputs,
)

Key = Callable[..., str]
ART_PRICE = 3


def make_art(url: str, key: str, **fields: object) -> httpx.Response:
    """The fields as file parts, as the seed's Python example sends them."""
    files: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, bytes):
            files[name] = (f"{name}.png", value, "image/png")
        else:
            files[name] = (None, str(value))
    return httpx.post(f"{url}/make-art", headers={"Authorization": key}, files=files, timeout=60)


def test_the_curl_way_with_a_style(api_url: str, new_key: Key, tmp_path: Path) -> None:
    key = new_key(100)
    result = subprocess.run(
        [
            "curl", "-sS", "-D", "-",
            "-H", f"Authorization: {key}",
            "-F", "inputText=An astronaut riding a horse on Mars",
            "-F", "styleId=1",
            "-F", "someOptionSdqLacks=yes",
            "-o", "astronaut.jpg",
            f"{api_url}/make-art",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout.startswith("HTTP/1.1 200"), result.stdout
    headers = dict(
        line.split(": ", 1) for line in result.stdout.lower().splitlines()[1:] if ": " in line
    )
    assert headers["x-api-credits-left"] == str(100 - ART_PRICE)
    assert headers["content-type"] == "image/jpeg"
    with Image.open(tmp_path / "astronaut.jpg") as image:
        assert image.format == "JPEG"
    job = get(api_url, f"/v1/jobs/{headers['x-job-id']}", key).json()
    assert job["tier"] == "art" and job["cost"] == ART_PRICE
    assert job["style"] == "photographic" and job["model_id"] == "sdxl"
    photographic = load_styles().get(1)
    assert job["prompt"] == photographic.prompt.replace(
        "{prompt}", "An astronaut riding a horse on Mars"
    )
    assert job["negative_prompt"] == photographic.negative_prompt
    assert credits(api_url, key) == 100 - ART_PRICE


def test_a_seed_image_makes_an_image_of_its_size(
    api_url: str, new_key: Key, tmp_path: Path, storage: S3Storage, settings: Settings
) -> None:
    key = new_key(10)
    seed = tmp_path / "seed.png"
    seed.write_bytes(picture(100, 72))
    with seed.open("rb") as file:
        # As a Hotpot client would: requests, every field a file part, the image a real file.
        response = requests.post(
            f"{api_url}/make-art",
            headers={"Authorization": key},
            files={
                "inputText": "a watercolor harbour",
                "promptStrength": "0.6",
                "outputFormat": "png",
                "seedImage": file,
            },
            timeout=60,
        )
    assert response.status_code == 200, response.text
    assert response.headers["X-API-Credits-Left"] == str(10 - ART_PRICE)
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG"
        assert image.size == (96, 72)  # the input's, rounded down to multiples of 8
    job_id = response.headers["X-Job-Id"]
    job = get(api_url, f"/v1/jobs/{job_id}", key).json()
    assert job["init_image_key"] == f"{settings.s3_prefix}/{job_id}/input.png"
    assert job["request"]["init_image"] is None  # never the bytes in the job store
    assert job["request"]["strength"] == 0.6
    assert (job["request"]["width"], job["request"]["height"]) == (96, 72)
    stored = storage.get(job["init_image_key"])
    assert stored.content_type == "image/png"
    with Image.open(io.BytesIO(stored.body)) as original:
        assert original.size == (100, 72)


def test_a_seed_image_as_base64_text_url_encoded(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    response = httpx.post(
        f"{api_url}/make-art",
        headers={"Authorization": key},
        data={
            "inputText": "a lighthouse",
            "seedImage": "data:image/jpeg;base64," + b64(picture(200, 120, "JPEG")),
            "width": "64",
            "height": "64",
            "styleId": "anime",
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (64, 64)  # width and height given: the input is resized
    job = get(api_url, f"/v1/jobs/{response.headers['X-Job-Id']}", key).json()
    assert job["style"] == "anime" and job["request"]["strength"] == 0.8


CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"styleId": "2"}, "inputText: is required"),
        (
            {"inputText": "x", "seedImage": CORRUPT_PNG},
            "seedImage: not a valid PNG, JPEG or WebP image",
        ),
        (
            {"inputText": "x", "seedImage": b"GIF89a" + b"\x00" * 100},
            "seedImage: not a valid PNG, JPEG or WebP image",
        ),
        (
            {"inputText": "x", "seedImage": picture(64, 64), "promptStrength": "1.5"},
            "promptStrength: Input should be less than or equal to 1",
        ),
        (
            {"inputText": "x", "seedImage": picture(4100, 64)},
            "seedImage: at most 4096 pixels a side (SDQ_MAX_INIT_IMAGE_SIDE), this one is 4100x64",
        ),
        (
            {"inputText": "x", "seedImage": picture(1600, 64)},
            "seedImage: the output takes the input's size, 1600x64, and tier art allows at "
            "most 1536 a side; send width and height to resize it",
        ),
        (
            {"inputText": "x", "seedImage": picture(64, 64), "width": "2048"},
            "width must be at most 1536 on tier art",
        ),
        ({"inputText": "x", "styleId": "999"}, "unknown style '999'; GET /v1/styles lists them"),
    ],
)
def test_a_bad_form_is_400_and_costs_nothing(
    api_url: str,
    new_key: Key,
    storage: S3Storage,
    settings: Settings,
    fields: dict[str, object],
    message: str,
) -> None:
    key = new_key(10)
    before = stored_inputs(storage, settings)
    response = make_art(api_url, key, **fields)
    assert_refused_free(api_url, key, response, message, before, storage, settings)


def test_a_refused_charge_leaves_no_input_behind(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings
) -> None:
    key = new_key(ART_PRICE - 1)
    before = stored_inputs(storage, settings)
    response = make_art(api_url, key, inputText="x", seedImage=picture(64, 64))
    assert response.status_code == 429
    assert response.json()["message"] == (
        f"not enough credits: this request costs {ART_PRICE}, the key has {ART_PRICE - 1}"
    )
    assert stored_inputs(storage, settings) == before
    assert credits(api_url, key) == ART_PRICE - 1 and own_jobs(api_url, key) == []


def test_an_idempotent_retry_stores_and_charges_once(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings
) -> None:
    key = new_key(10)
    seed = picture(64, 64)
    before = stored_inputs(storage, settings)
    answers = [
        httpx.post(
            f"{api_url}/make-art",
            headers={"Authorization": key, "Idempotency-Key": "art-1"},
            files={"inputText": (None, "a kite"), "seedImage": ("s.png", seed, "image/png")},
            timeout=60,
        )
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].headers["X-Job-Id"] == answers[1].headers["X-Job-Id"]
    assert answers[0].content == answers[1].content
    assert credits(api_url, key) == 10 - ART_PRICE
    job_id = answers[0].headers["X-Job-Id"]
    assert stored_inputs(storage, settings) - before == {f"{settings.s3_prefix}/{job_id}/input.png"}
    # The same key with another image is another request.
    other = httpx.post(
        f"{api_url}/make-art",
        headers={"Authorization": key, "Idempotency-Key": "art-1"},
        files={
            "inputText": (None, "a kite"),
            "seedImage": ("s.png", picture(72, 64), "image/png"),
        },
        timeout=60,
    )
    assert other.status_code == 409
    assert credits(api_url, key) == 10 - ART_PRICE
    assert len(stored_inputs(storage, settings) - before) == 1
