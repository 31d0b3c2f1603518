"""The served OpenAPI document and the docs pages: a valid 3.1 document, each operation once,
the API key as a security scheme on exactly the routes that ask for one, error answers with
their `{"code", "message"}` body, and Swagger UI and ReDoc working without internet."""

from __future__ import annotations

from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from openapi_spec_validator import validate

from common.job import ALL_EVENTS
from producer.api.admin import OFF

Key = Callable[..., str]
Spec = dict[str, Any]
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def spec(api_url: str) -> Spec:
    response = httpx.get(f"{api_url}/openapi.json")
    assert response.status_code == 200
    document: Spec = response.json()
    return document


def operations(spec: Spec) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def keys(value: Any) -> set[str]:
    """Every key anywhere in a JSON value."""
    if isinstance(value, dict):
        return set(value).union(*(keys(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(keys(item) for item in value))
    return set()


def filled(path: str) -> str:
    """A path with its parameters filled in (ids that name nothing)."""
    return path.replace("{job_id}", "job_nope").replace("{batch_id}", "batch_nope")


def test_the_document_is_valid_openapi_3_1(spec: Spec) -> None:
    assert spec["openapi"].startswith("3.1.")
    validate(spec)  # raises on anything openapi-spec-validator rejects
    assert "itemSchema" not in keys(spec)  # OpenAPI 3.2's: not for a 3.1 document


def test_each_operation_appears_once(spec: Spec) -> None:
    ops = operations(spec)
    ids = [operation["operationId"] for _, _, operation in ops]
    assert len(ids) == len(set(ids)), ids
    # Swagger UI and ReDoc list an operation under each of its tags.
    assert all(len(operation["tags"]) == 1 for _, _, operation in ops), [
        (method, path, operation["tags"]) for method, path, operation in ops
    ]
    declared = [tag["name"] for tag in spec["tags"]]
    assert {operation["tags"][0] for _, _, operation in ops} == set(declared)
    assert {"create_job", "job_events", "create_batch", "tiers", "stable_diffusion_normal"} <= set(
        ids
    )
    assert {"make_art", "styles", "models"} <= set(ids)
    # The art tier is served by /make-art only, as Hotpot's Image Generator is.
    assert "/stable-diffusion-art" not in spec["paths"]


def test_the_api_key_is_a_security_scheme_on_every_route_that_needs_it(
    api_url: str, spec: Spec, new_key: Key
) -> None:
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    assert set(spec["components"]["securitySchemes"]) == {"ApiKey", "AdminToken"}
    secured, admin, open_ = [], [], []
    for method, path, operation in operations(spec):
        # The header is the scheme's, not a parameter Swagger would ask for again.
        assert "authorization" not in {p["name"].lower() for p in operation.get("parameters", [])}
        response = httpx.request(method, api_url + filled(path), timeout=30)
        if operation.get("security") == [{"ApiKey": []}]:
            secured.append(path)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json() == {
                "code": 401,
                "message": "missing API key: send it in the Authorization header",
            }
        elif operation.get("security") == [{"AdminToken": []}]:
            # The session's API has no SDQ_ADMIN_TOKEN: the admin API is off, and says so.
            admin.append(path)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json() == {"code": 403, "message": OFF}
        else:
            open_.append(path)
            assert operation.get("security") is None, (method, path)
            assert response.status_code == 200, (method, path, response.text)
    assert sorted(open_) == ["/healthz", "/metrics", "/readyz"]
    assert len(secured) >= 13
    assert all(path.startswith("/admin/v1/") for path in admin) and len(admin) >= 9
    # What Swagger UI sends once Authorize holds the key: the bare key, as Hotpot takes it.
    key = new_key(7)
    account = httpx.get(f"{api_url}/v1/account", headers={"Authorization": key})
    assert account.status_code == 200 and account.json()["credits"] == 7


def test_error_answers_are_documented_with_the_error_body(spec: Spec) -> None:
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["code", "message"]
    assert error["properties"]["code"]["type"] == "integer"
    documented: dict[tuple[str, str], set[int]] = {}
    for method, path, operation in operations(spec):
        responses = operation["responses"]
        assert "422" not in responses, (method, path)  # a bad request answers 400
        codes = {int(code) for code in responses}
        documented[(method, path)] = codes
        for code, response in responses.items():
            if int(code) < 400 or path == "/readyz":
                continue
            media = response["content"]["application/json"]
            assert media["schema"] == {"$ref": "#/components/schemas/Error"}, (method, path, code)
            assert media["example"]["code"] == int(code)
            assert response["description"]
        if operation.get("security") == [{"AdminToken": []}]:
            assert {401, 403} <= codes, (method, path)
        elif operation.get("security"):
            assert {401, 403, 429} <= codes, (method, path)
            assert "Retry-After" in responses["429"]["headers"], (method, path)
    assert "ValidationError" not in spec["components"]["schemas"]
    submits = ("/v1/jobs", "/v1/batches", "/stable-diffusion-normal", "/make-art")
    for path in submits:
        assert {400, 403, 408, 409, 413, 429, 503} <= documented[("post", path)], path
    for path in ("/stable-diffusion-budget", "/make-art"):
        hotpot = documented[("post", path)]
        assert {500, 504} <= hotpot and 404 not in hotpot
    for path in ("/v1/styles", "/v1/models"):
        assert documented[("get", path)] == {200, 401, 403, 429}, path
    assert 404 in documented[("get", "/v1/jobs/{job_id}")]
    assert 409 in documented[("post", "/v1/jobs/{job_id}/cancel")]
    events = documented[("get", "/v1/jobs/{job_id}/events")]
    assert {400, 404, 429, 503} <= events and 413 not in events
    assert documented[("get", "/v1/tiers")] == {200, 401, 403, 429}
    readyz = spec["paths"]["/readyz"]["get"]["responses"]["503"]
    assert readyz["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"
    }


def test_the_answers_one_gets_are_the_documented_ones(
    api_url: str, spec: Spec, new_key: Key
) -> None:
    key = {"Authorization": new_key(1)}  # less than a premium image costs
    cases = [
        ("post", "/v1/jobs", {"json": {"prompt": "x", "steps": 0}}, 400),
        (
            "post",
            "/v1/jobs",
            {"json": {"prompt": "x"}, "headers": {"Authorization": "sdq_no"}},
            403,
        ),
        ("post", "/v1/jobs", {"content": b"{" * (70 * 1024)}, 413),
        ("post", "/v1/batches", {"json": {"jobs": []}}, 400),
        ("get", "/v1/jobs?limit=0", {}, 400),
        ("get", "/v1/jobs/job_nope", {}, 404),
        ("post", "/v1/jobs/job_nope/cancel", {}, 404),
        ("post", "/v1/jobs/job_nope/webhook/redeliver", {}, 404),
        ("get", "/v1/jobs/job_nope/events", {}, 404),
        ("get", "/v1/batches/batch_nope", {}, 404),
        ("post", "/stable-diffusion-normal", {"data": {"inputText": "x", "steps": "0"}}, 400),
        ("post", "/stable-diffusion-premium", {"data": {"inputText": "x"}}, 429),
        ("post", "/v1/jobs", {"json": {"prompt": "x", "style": "nope"}}, 400),
        ("post", "/v1/jobs", {"json": {"prompt": "x", "model": "sd15"}}, 403),
        ("post", "/v1/jobs", {"json": {"prompt": "x", "init_image": "AAAA"}}, 400),
        ("post", "/make-art", {"data": {"inputText": "x", "promptStrength": "2"}}, 400),
        ("post", "/make-art", {"data": {"inputText": "x"}}, 429),
    ]
    for method, path, send, status in cases:
        headers = {**key, "content-type": "application/json"} if "content" in send else key
        headers = {**headers, **send.pop("headers", {})}
        response = httpx.request(method, api_url + path, headers=headers, timeout=60, **send)
        assert response.status_code == status, (method, path, response.text)
        body = response.json()
        assert body["code"] == status and isinstance(body["message"], str), body
        template = path.split("?")[0].replace("job_nope", "{job_id}")
        template = template.replace("batch_nope", "{batch_id}")
        responses = spec["paths"][template][method]["responses"]
        assert str(status) in responses, (method, path, status)


def test_the_event_stream_is_documented(spec: Spec) -> None:
    ok = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    stream = ok["content"]["text/event-stream"]
    assert stream["schema"]["type"] == "string"
    assert "event: job.queued" in stream["example"]
    event = stream["x-itemSchema"]
    assert event["properties"]["event"]["enum"] == ALL_EVENTS
    assert event["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/Event"}
    assert {"type", "timestamp", "data"} <= set(spec["components"]["schemas"]["Event"]["required"])


class Assets(HTMLParser):
    """The URLs a page loads: scripts, stylesheets, icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(found["src"] or "")
        if tag == "link" and found.get("href"):
            self.urls.append(found["href"] or "")


@pytest.mark.parametrize(("page", "kinds"), [("/docs", {"js", "css"}), ("/redoc", {"js"})])
def test_the_docs_pages_load_nothing_from_another_host(
    api_url: str, page: str, kinds: set[str]
) -> None:
    response = httpx.get(api_url + page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "http://" not in html and "https://" not in html  # no CDN, no fonts, no badge
    parser = Assets()
    parser.feed(html)
    assert {url.rsplit(".", 1)[-1] for url in parser.urls} >= kinds, parser.urls
    for url in parser.urls:
        absolute = urljoin(api_url + page, url)
        assert urlsplit(absolute).netloc == urlsplit(api_url).netloc, url
        asset = httpx.get(absolute)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url
    assert "/openapi.json" in html


def test_the_image_inputs_are_documented(spec: Spec) -> None:
    """The fields of styles, models and image-to-image, in the forms and the JSON body."""
    for path in ("/make-art", "/stable-diffusion-normal"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]
        form = body["multipart/form-data"]["schema"]["properties"]
        assert form["seedImage"]["format"] == "binary", path
        assert (form["promptStrength"]["minimum"], form["promptStrength"]["maximum"]) == (0, 1)
        assert "GET /v1/styles" in form["styleId"]["description"]
        assert body["application/x-www-form-urlencoded"]["schema"]["properties"] == form
    assert (
        "steps"
        not in spec["paths"]["/make-art"]["post"]["requestBody"]["content"]["multipart/form-data"][
            "schema"
        ]["properties"]
    )
    job = spec["components"]["schemas"]["JobRequest"]["properties"]
    assert {"style", "model", "init_image", "strength"} <= set(job)
    view = spec["components"]["schemas"]["JobView"]["properties"]
    assert {"style", "prompt", "negative_prompt", "model_id", "init_image_key"} <= set(view)
    tier = spec["components"]["schemas"]["TierView"]["properties"]
    assert {"default_model", "models"} <= set(tier)
    assert {"StyleView", "ModelView"} <= set(spec["components"]["schemas"])
