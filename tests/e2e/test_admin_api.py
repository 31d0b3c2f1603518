"""The admin API (`/admin/v1`) against a real API process with `SDQ_ADMIN_TOKEN` set: a key's
whole life (create, use, top up, list, usage, webhook secret rotation, revoke) recorded in the
audit log; every admin route refusing a request without the token (read from the app's own
route table); bounded bodies; atomic top-ups; exact errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from common.settings import Settings
from producer.api import admin
from producer.api.admin import INVALID, MISSING, OFF
from producer.api.app import create_app
from producer.servers import free_port
from tests.receiver import Receiver
from tests.support import spawn, stop, wait_until

TOKEN = "test-admin-token-0123456789abcdef-0123456789"
FREE_CREDITS = 25
Key = Callable[..., str]


def flat(routes: Any) -> Iterator[Any]:
    """Each route, inside the routers an app includes (FastAPI nests them in its list)."""
    for route in routes:
        nested = getattr(route, "effective_route_contexts", None)
        if nested is not None:
            yield from nested()
        else:
            yield route


def routes_of(routes: Any) -> list[tuple[str, str]]:
    """Every (method, path) under /admin among ``routes``."""
    found = {
        (method, path)
        for route in flat(routes)
        if (path := getattr(route, "path", "")).startswith("/admin")
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    return sorted(found)


#: Read at collection, from the admin router; ``test_the_route_table_has_no_other_admin_route``
#: checks the app's whole route table against it, so no admin route escapes.
ROUTES = routes_of(admin.router.routes)


def start_admin_api(
    env: dict[str, str], workdir: Path, name: str, **overrides: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """An API process of its own with the admin token set (the session's API has none)."""
    port = free_port()
    log = workdir / f"api-{name}.log"
    values = {
        "SDQ_ADMIN_TOKEN": TOKEN,
        "SDQ_FREE_CREDITS": str(FREE_CREDITS),
        "SDQ_WEBHOOK_REDELIVER_INTERVAL_SECONDS": "0",
        **overrides,
    }
    argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port)]
    proc = spawn(argv, log, {**env, **values})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "admin api", proc, log)
    return url, proc


@pytest.fixture(scope="module")
def admin_url(env: dict[str, str], workdir: Path, worker: subprocess.Popen[bytes]) -> Iterator[str]:
    url, proc = start_admin_api(env, workdir, "admin")
    yield url
    stop(proc)


def call(url: str, method: str, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=30, **kw)


def tenant(url: str, method: str, path: str, key: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers={"Authorization": key}, timeout=30, **kw)


def filled(path: str) -> str:
    return path.replace("{key_id}", "key_0000000000000000")


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def delivery(receiver: Receiver, path: str, count: int) -> tuple[str, dict[str, str]]:
    got = receiver.wait_for(path, count, timeout=30)[count - 1]
    return got.body.decode(), got.headers


def test_a_key_through_its_whole_life(admin_url: str, receiver: Receiver) -> None:
    # Created over the admin API without credits: SDQ_FREE_CREDITS.
    created = call(admin_url, "POST", "/admin/v1/keys", json={"name": "acme"})
    assert created.status_code == 201, created.text
    body = created.json()
    key, key_id = body["key"], body["id"]
    assert key.startswith("sdq_") and body["credits"] == FREE_CREDITS and body["name"] == "acme"
    first_secret = tenant(admin_url, "GET", "/v1/account", key).json()["webhook_secret"]

    # Used: a job (budget: 1 credit an image) whose webhook the receiver verifies.
    hook = f"/life-{key_id}"
    job = tenant(
        admin_url,
        "POST",
        "/v1/jobs",
        key,
        json={
            "prompt": "a lighthouse",
            "tier": "budget",
            "steps": 2,
            "webhook_url": receiver.url + hook,
            "webhook_events": ["job.succeeded"],
        },
    )
    assert job.status_code == 202, job.text
    assert job.headers["X-API-Credits-Left"] == str(FREE_CREDITS - 1)
    job_id = job.json()["id"]
    payload, headers = delivery(receiver, hook, 1)
    assert Webhook(first_secret).verify(payload, headers)["data"]["id"] == job_id
    assert len(headers["webhook-signature"].split(" ")) == 1

    # Topped up: an increment.
    topped = call(admin_url, "PATCH", f"/admin/v1/keys/{key_id}", json={"add_credits": 100})
    assert topped.status_code == 200, topped.text
    assert topped.json()["credits"] == FREE_CREDITS - 1 + 100
    assert tenant(admin_url, "GET", "/v1/account", key).json()["credits"] == FREE_CREDITS + 99

    # Listed: found by following the cursor.
    seen: list[str] = []
    cursor = None
    while key_id not in seen:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = call(admin_url, "GET", "/admin/v1/keys", params=params).json()
        seen += [item["id"] for item in page["keys"]]
        cursor = page["next_cursor"]
        assert cursor or key_id in seen
    listed = next(item for item in page["keys"] if item["id"] == key_id)
    assert listed["credits"] == FREE_CREDITS + 99 and "digest" not in listed
    assert "webhook_secret" not in listed
    assert len(seen) == len(set(seen))  # pages never repeat a key

    # Its usage, as the tenant and the operator see it.
    span = {"from": today(), "to": today()}
    mine = tenant(admin_url, "GET", "/v1/usage", key, params=span).json()
    counts = {"images": 1, "debited": 1, "refunded": 0, "net": 1}
    assert mine["total"] == counts and mine["tiers"] == {"budget": counts}
    assert mine["days"] == [{"date": today(), "tiers": {"budget": counts}, "total": counts}]
    seen_by_admin = call(admin_url, "GET", f"/admin/v1/keys/{key_id}/usage", params=span).json()
    assert seen_by_admin["days"] == mine["days"] and seen_by_admin["key_id"] == key_id
    fleet = call(admin_url, "GET", "/admin/v1/usage", params=span).json()
    assert fleet["key_id"] is None and fleet["tiers"]["budget"]["images"] >= 1

    # Its webhook secret rotated: during the overlap, deliveries carry both signatures.
    rotated = call(
        admin_url, "POST", f"/admin/v1/keys/{key_id}/rotate-secret", json={"overlap_seconds": 3}
    )
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["webhook_secret"]
    expires = rotated.json()["previous_secret_expires_at"]
    assert new_secret.startswith("whsec_") and new_secret != first_secret
    assert expires == pytest.approx(time.time() + 3, abs=1)
    account = tenant(admin_url, "GET", "/v1/account", key).json()
    assert account["webhook_secret"] == new_secret
    assert account["previous_secret_expires_at"] == pytest.approx(expires)
    assert tenant(admin_url, "POST", f"/v1/jobs/{job_id}/webhook/redeliver", key).status_code == 202
    payload, headers = delivery(receiver, hook, 2)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new_secret).verify(payload, headers)["data"]["id"] == job_id
    assert Webhook(first_secret).verify(payload, headers)["data"]["id"] == job_id

    # After the overlap, only the new secret signs.
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    assert tenant(admin_url, "GET", "/v1/account", key).json()["previous_secret_expires_at"] is None
    assert tenant(admin_url, "POST", f"/v1/jobs/{job_id}/webhook/redeliver", key).status_code == 202
    payload, headers = delivery(receiver, hook, 3)
    assert len(headers["webhook-signature"].split(" ")) == 1
    assert Webhook(new_secret).verify(payload, headers)["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(first_secret).verify(payload, headers)

    # Revoked: refused at once.
    revoked = call(admin_url, "POST", f"/admin/v1/keys/{key_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    refused = tenant(admin_url, "POST", "/v1/jobs", key, json={"prompt": "x", "tier": "budget"})
    assert refused.status_code == 403
    assert refused.json() == {"code": 403, "message": "this API key was revoked"}
    assert tenant(admin_url, "GET", "/v1/account", key).status_code == 403

    # All of it in the audit log, newest first, without a secret.
    audit = call(admin_url, "GET", "/admin/v1/audit", params={"limit": 200})
    assert audit.status_code == 200
    entries = [e for e in audit.json()["entries"] if e["key_id"] == key_id]
    assert [e["action"] for e in entries] == ["revoke", "rotate-secret", "update", "create"]
    assert entries[2]["changes"] == {"add_credits": 100}
    assert entries[1]["changes"] == {"overlap_seconds": 3.0}
    assert entries[3]["changes"]["credits"] == FREE_CREDITS
    assert all(e["actor"] == "admin-api 127.0.0.1" for e in entries)
    assert all(e["at"] == pytest.approx(time.time(), abs=120) for e in entries)
    text = json.dumps(audit.json())
    assert key not in text and first_secret not in text and new_secret not in text


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_admin_route_needs_the_admin_token(
    admin_url: str, api_url: str, new_key: Key, method: str, path: str
) -> None:
    target = filled(path)
    missing = call(admin_url, method, target, token=None, json={})
    assert missing.status_code == 401, missing.text
    assert missing.json() == {"code": 401, "message": MISSING}
    for token in ("wrong-token", TOKEN + "x", TOKEN[:-1], TOKEN.upper()):
        wrong = call(admin_url, method, target, token=token, json={})
        assert wrong.status_code == 403, (token, wrong.text)
        assert wrong.json() == {"code": 403, "message": INVALID}
    empty = httpx.request(
        method, admin_url + target, headers={"Authorization": "Bearer"}, json={}, timeout=30
    )
    assert empty.status_code == 401 and empty.json()["message"] == MISSING
    # A tenant's key is no admin token, bare or as a bearer.
    key = new_key(5)
    for header in (key, f"Bearer {key}", TOKEN):  # the token itself, without "Bearer"
        as_tenant = httpx.request(
            method, admin_url + target, headers={"Authorization": header}, json={}, timeout=30
        )
        assert as_tenant.status_code == 403, (header, as_tenant.text)
        assert as_tenant.json() == {"code": 403, "message": INVALID}
    # Where SDQ_ADMIN_TOKEN is not set (the session's API), the admin API is off.
    off = call(api_url, method, target, json={})
    assert off.status_code == 403 and off.json() == {"code": 403, "message": OFF}


def test_the_route_table_has_no_other_admin_route(settings: Settings) -> None:
    assert routes_of(create_app(settings).routes) == ROUTES
    names = {path for _, path in ROUTES}
    assert {
        "/admin/v1/keys",
        "/admin/v1/keys/{key_id}",
        "/admin/v1/keys/{key_id}/revoke",
        "/admin/v1/keys/{key_id}/rotate-secret",
        "/admin/v1/keys/{key_id}/usage",
        "/admin/v1/usage",
        "/admin/v1/audit",
    } <= names
    assert ("PATCH", "/admin/v1/keys/{key_id}") in ROUTES


def test_admin_routes_are_documented_under_their_tag_with_a_bearer_scheme(admin_url: str) -> None:
    spec = httpx.get(f"{admin_url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["AdminToken"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["AdminToken"]["scheme"] == "bearer"
    assert "Admin" in [tag["name"] for tag in spec["tags"]]
    documented = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if path.startswith("/admin")
    }
    assert documented == set(ROUTES)
    for method, path in ROUTES:
        operation = spec["paths"][path][method.lower()]
        assert operation["tags"] == ["Admin"], path
        assert operation["security"] == [{"AdminToken": []}], path
        assert {"401", "403"} <= set(operation["responses"]), path


def test_an_admin_body_is_bounded_and_refused_unread_without_the_token(admin_url: str) -> None:
    huge = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    too_big = call(admin_url, "POST", "/admin/v1/keys", content=huge)
    assert too_big.status_code == 413
    assert too_big.json()["message"].startswith("request body too large: at most")
    unread = call(admin_url, "POST", "/admin/v1/keys", token=None, content=huge)
    assert unread.status_code == 401 and unread.headers["connection"] == "close"


def test_concurrent_top_ups_all_count(admin_url: str) -> None:
    key_id = call(admin_url, "POST", "/admin/v1/keys", json={"credits": 0}).json()["id"]

    def top_up(_: int) -> int:
        path = f"/admin/v1/keys/{key_id}"
        return call(admin_url, "PATCH", path, json={"add_credits": 5}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(top_up, range(40))) == {200}
    assert call(admin_url, "GET", f"/admin/v1/keys/{key_id}").json()["credits"] == 200


def test_updates_set_limits_models_and_disable_and_refuse_what_is_wrong(
    admin_url: str,
) -> None:
    made = call(
        admin_url, "POST", "/admin/v1/keys", json={"credits": 3, "rate": 5, "models": ["sd15"]}
    ).json()
    key, key_id = made["key"], made["id"]
    assert (made["rate"], made["models"], made["max_jobs"]) == (5.0, ["sd15"], None)
    path = f"/admin/v1/keys/{key_id}"
    changed = call(
        admin_url,
        "PATCH",
        path,
        json={"rate": None, "max_jobs": 7, "max_priority": 9, "models": [], "name": "b"},
    ).json()
    assert (changed["rate"], changed["max_jobs"], changed["max_priority"]) == (None, 7, 9)
    assert (changed["models"], changed["name"]) == ([], "b")
    account = tenant(admin_url, "GET", "/v1/account", key).json()
    assert (account["max_jobs"], account["max_priority"]) == (7, 9)

    # Disabled: refused until enabled again.
    assert call(admin_url, "PATCH", path, json={"disabled": True}).json()["disabled"] is True
    refused = tenant(admin_url, "GET", "/v1/account", key)
    assert refused.json() == {"code": 403, "message": "this API key is disabled"}
    assert call(admin_url, "PATCH", path, json={"disabled": False}).json()["disabled"] is False
    assert tenant(admin_url, "GET", "/v1/account", key).status_code == 200

    def refused_with(method: str, route: str, status: int, message: str, **kw: Any) -> None:
        answer = call(admin_url, method, route, **kw)
        assert answer.status_code == status, answer.text
        assert answer.json()["message"] == message

    refused_with(
        "PATCH",
        path,
        409,
        f"API key {key_id} has 3 credits: they cannot go below zero",
        json={"add_credits": -4},
    )
    refused_with(
        "PATCH",
        path,
        400,
        "nothing to change: give add_credits, name, a limit, models or disabled",
        json={},
    )
    refused_with(
        "PATCH",
        path,
        400,
        "models: unknown model 'sd99'; choose one of: sdxl, sd15, sd21",
        json={"models": ["sd99"]},
    )
    refused_with("PATCH", path, 400, "credits: Extra inputs are not permitted", json={"credits": 5})
    refused_with(
        "GET", "/admin/v1/keys/key_ffffffffffffffff", 404, "no API key key_ffffffffffffffff"
    )
    refused_with(
        "GET",
        "/admin/v1/keys/nope",
        404,
        "no API key with this id: ids look like key_0123456789abcdef",
    )
    refused_with(
        "GET",
        "/admin/v1/keys",
        400,
        "cursor: not a cursor this API gave out",
        params={"cursor": "x"},
    )
    refused_with(
        "GET",
        "/admin/v1/audit",
        400,
        "cursor: not a cursor this API gave out",
        params={"cursor": "x"},
    )
    refused_with(
        "GET",
        "/admin/v1/keys",
        400,
        "limit: Input should be less than or equal to 200",
        params={"limit": 201},
    )
    # Found by the key itself, in a body; then revoked, which is final.
    found = call(admin_url, "POST", "/admin/v1/keys/lookup", json={"key": key})
    assert found.status_code == 200 and found.json()["id"] == key_id
    assert call(admin_url, "POST", f"{path}/revoke").status_code == 200
    revoked = f"API key {key_id} was revoked: a revoked key cannot be changed"
    refused_with("POST", f"{path}/revoke", 409, revoked)
    refused_with("PATCH", path, 409, revoked, json={"add_credits": 1})
    refused_with("POST", f"{path}/rotate-secret", 409, revoked)
