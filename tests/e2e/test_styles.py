"""Styles, tiers and models as a client sees them: `GET /v1/styles`, `/v1/tiers`,
`/v1/models`; a styled job runs the styled prompt, an unknown style is a 400 that says how
to list them and costs nothing."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
from PIL import Image

from common.styles import load_styles
from tests.e2e.api_calls import credits, get, own_jobs, wait

Key = Callable[..., str]


def test_the_styles_are_listed_with_their_templates_and_defaults(
    api_url: str, new_key: Key
) -> None:
    assert get(api_url, "/v1/styles", None).status_code == 401
    assert get(api_url, "/v1/styles", "sdq_nope").status_code == 403
    response = get(api_url, "/v1/styles", new_key(0))
    assert response.status_code == 200, response.text
    styles = response.json()["styles"]
    shipped = list(load_styles())
    assert [s["id"] for s in styles] == [s.id for s in shipped] == list(range(1, 15))
    anime = next(s for s in styles if s["slug"] == "anime")
    assert anime["id"] == 3 and anime["name"] == "Anime"
    assert "{prompt}" in anime["prompt"] and anime["negative_prompt"]
    assert anime["guidance_scale"] == 7.0
    assert set(anime) >= {"steps", "scheduler", "model"}


def test_tiers_show_their_models(api_url: str, new_key: Key) -> None:
    tiers = {t["name"]: t for t in get(api_url, "/v1/tiers", new_key(0)).json()["tiers"]}
    assert tiers["normal"]["default_model"] == "sdxl"
    assert tiers["normal"]["models"] == ["sdxl", "sd15", "sd21"]
    assert tiers["premium"]["models"] == ["sdxl"]
    assert tiers["art"]["price"] == 3 and tiers["art"]["max_images"] == 1


def test_models_say_whether_this_key_is_entitled(api_url: str, new_key: Key) -> None:
    plain = {m["id"]: m for m in get(api_url, "/v1/models", new_key(0)).json()["models"]}
    assert set(plain) == {"sdxl", "sd15", "sd21"}
    sdxl, sd15 = plain["sdxl"], plain["sd15"]
    assert sdxl["entitled"] is True and "art" in sdxl["default_on"]
    assert (sdxl["family"], sdxl["native_side"]) == ("sdxl", 1024)
    assert sd15["entitled"] is False and sd15["default_on"] == []
    assert sd15["tiers"] == ["budget", "normal"] and sd15["native_side"] == 512
    entitled = get(api_url, "/v1/models", new_key(0, models=["sd15"])).json()["models"]
    assert {m["id"]: m["entitled"] for m in entitled} == {"sdxl": True, "sd15": True, "sd21": False}
    assert get(api_url, "/v1/models", None).status_code == 401


def test_a_styled_job_runs_the_styled_prompt(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    anime = load_styles().get("anime")
    body = {"prompt": "a red fox", "negative_prompt": "blurry", "style": 3, "tier": "budget"}
    response = httpx.post(
        f"{api_url}/v1/jobs", json=body, headers={"Authorization": key}, timeout=30
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["style"] == "anime"
    assert job["prompt"] == anime.prompt.replace("{prompt}", "a red fox")
    assert job["negative_prompt"] == f"blurry, {anime.negative_prompt}"
    assert job["request"]["prompt"] == "a red fox"  # as asked
    assert job["request"]["guidance_scale"] == 7.0  # the style's default
    assert job["model_id"] == "sdxl" and job["credits_left"] == 9
    done = wait(api_url, key, job["id"])
    assert done["status"] == "succeeded", done
    assert done["prompt"] == job["prompt"] and done["style"] == "anime"
    # By slug, with the request's own guidance kept over the style's.
    body = {"prompt": "a red fox", "style": "Line-Art", "guidance_scale": 3, "tier": "budget"}
    job = httpx.post(
        f"{api_url}/v1/jobs", json=body, headers={"Authorization": key}, timeout=30
    ).json()
    assert job["style"] == "line-art" and job["request"]["guidance_scale"] == 3
    assert job["prompt"].startswith("line art drawing of a red fox")


def test_an_unknown_style_is_400_and_says_how_to_list_them(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    for style in (99, "no-such-style"):
        response = httpx.post(
            f"{api_url}/v1/jobs",
            json={"prompt": "a fox", "style": style},
            headers={"Authorization": key},
            timeout=30,
        )
        assert response.status_code == 400, response.text
        assert response.json() == {
            "code": 400,
            "message": f"unknown style {style!r}; GET /v1/styles lists them",
        }
    response = httpx.post(
        f"{api_url}/v1/batches",
        json={"jobs": [{"prompt": "a fox"}, {"prompt": "a fox", "style": 0}]},
        headers={"Authorization": key},
        timeout=30,
    )
    assert response.status_code == 400 and "GET /v1/styles" in response.json()["message"]
    response = httpx.post(
        f"{api_url}/stable-diffusion-normal",
        files={"inputText": (None, "a fox"), "styleId": (None, "77")},
        headers={"Authorization": key},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["message"] == "unknown style '77'; GET /v1/styles lists them"
    assert credits(api_url, key) == 10 and own_jobs(api_url, key) == []


def test_style_id_on_the_stable_diffusion_endpoints(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    response = httpx.post(
        f"{api_url}/stable-diffusion-budget",
        files={"inputText": (None, "a castle"), "styleId": (None, "6")},
        headers={"Authorization": key},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-API-Credits-Left"] == "9"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "JPEG"
    job = get(api_url, f"/v1/jobs/{response.headers['X-Job-Id']}", key).json()
    assert job["style"] == "fantasy-art" and job["model_id"] == "sdxl"
    assert job["prompt"].startswith("ethereal fantasy concept art of a castle")
