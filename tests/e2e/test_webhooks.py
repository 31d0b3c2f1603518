"""Signed webhooks to a real receiver on loopback, retried from the store."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from common.apikeys import KeyStore
from tests.e2e.api_calls import auth
from tests.receiver import Receiver

Key = Callable[..., str]


def submit(api_url: str, key: str, **fields: Any) -> dict[str, Any]:
    body = {"prompt": "a harbour at night", "tier": "budget", "steps": 2, **fields}
    response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    return dict(response.json())


def secret(api_url: str, key: str) -> str:
    return str(httpx.get(f"{api_url}/v1/account", headers=auth(key)).json()["webhook_secret"])


def path() -> str:
    return f"/hook/{uuid.uuid4().hex}"


def deliveries(api_url: str, key: str, job_id: str) -> list[dict[str, Any]]:
    job = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(key)).json()
    return list(job["webhooks"])


def wait_state(api_url: str, key: str, job_id: str, event: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for delivery in deliveries(api_url, key, job_id):
            if delivery["event"] == event and delivery["state"] == state:
                return delivery
        time.sleep(0.1)
    raise AssertionError(f"{event} never reached {state}: {deliveries(api_url, key, job_id)}")


def test_every_status_change_arrives_signed(api_url: str, new_key: Key, receiver: Receiver) -> None:
    key = new_key()
    hook = path()
    job = submit(api_url, key, webhook_url=receiver.url + hook)
    got = receiver.wait_for(hook, 3)
    verifier = Webhook(secret(api_url, key))
    payloads = [verifier.verify(r.body, r.headers) for r in got]
    assert sorted(p["type"] for p in payloads) == ["job.queued", "job.started", "job.succeeded"]
    for payload, request in zip(payloads, got, strict=True):
        assert payload["data"]["id"] == job["id"]
        assert payload["data"]["status"] == payload["type"].removeprefix("job.").replace(
            "started", "running"
        )
        assert "key_id" not in payload["data"]
        suffix = payload["type"].removeprefix("job.")
        assert request.headers["webhook-id"] == f"msg_{job['id'].removeprefix('job_')}_{suffix}"
        assert request.headers["webhook-signature"].startswith("v1,")
    final = next(p for p in payloads if p["type"] == "job.succeeded")
    assert final["data"]["images"][0]["sha256"]


def test_tampering_and_stale_timestamps_fail_verification(
    api_url: str, new_key: Key, receiver: Receiver
) -> None:
    key = new_key()
    hook = path()
    submit(api_url, key, webhook_url=receiver.url + hook, webhook_events=["job.succeeded"])
    request = receiver.wait_for(hook, 1)[0]
    verifier = Webhook(secret(api_url, key))
    verifier.verify(request.body, request.headers)
    tampered = bytearray(request.body)
    tampered[10] ^= 1
    with pytest.raises(WebhookVerificationError):
        verifier.verify(bytes(tampered), request.headers)
    stale = {**request.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    with pytest.raises(WebhookVerificationError):
        verifier.verify(request.body, stale)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret(api_url, new_key())).verify(request.body, request.headers)


def test_events_filter(api_url: str, new_key: Key, receiver: Receiver) -> None:
    key = new_key()
    hook = path()
    submit(api_url, key, webhook_url=receiver.url + hook, webhook_events=["job.succeeded"])
    receiver.wait_for(hook, 1)
    time.sleep(0.5)
    assert [json.loads(r.body)["type"] for r in receiver.at(hook)] == ["job.succeeded"]


def test_progress_events_when_asked(api_url: str, new_key: Key, receiver: Receiver) -> None:
    key = new_key()
    hook = path()
    submit(api_url, key, steps=4, webhook_url=receiver.url + hook, webhook_events=["job.progress"])
    got = receiver.wait_for(hook, 4)
    steps = sorted(json.loads(r.body)["data"]["progress"]["step"] for r in got)
    assert steps == [1, 2, 3, 4]
    assert len({r.headers["webhook-id"] for r in got}) == 4


def test_retries_with_one_id_and_growing_delays(
    api_url: str, new_key: Key, receiver: Receiver
) -> None:
    key = new_key()
    hook = path()
    url = receiver.script(hook, (500, {}), (500, {}), (204, {}))
    job = submit(api_url, key, webhook_url=url, webhook_events=["job.succeeded"])
    got = receiver.wait_for(hook, 3)
    assert len({r.headers["webhook-id"] for r in got}) == 1
    delays = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert delays[0] >= 0.25 and delays[1] > delays[0], delays
    delivery = wait_state(api_url, key, job["id"], "job.succeeded", "delivered")
    assert delivery["attempts"] == 3
    assert [a["status_code"] for a in delivery["history"]] == [500, 500, 204]
    time.sleep(1)
    assert len(receiver.at(hook)) == 3  # nothing after the 2xx
    print(f"webhook retry delays: {[round(d, 2) for d in delays]}")


def test_retry_after_is_honoured(api_url: str, new_key: Key, receiver: Receiver) -> None:
    key = new_key()
    hook = path()
    url = receiver.script(hook, (429, {"Retry-After": "2"}), (204, {}))
    submit(api_url, key, webhook_url=url, webhook_events=["job.succeeded"])
    first, second = receiver.wait_for(hook, 2)
    assert second.at - first.at >= 1.9


def test_410_stops_retries(api_url: str, new_key: Key, receiver: Receiver) -> None:
    key = new_key()
    hook = path()
    url = receiver.script(hook, (410, {}))
    job = submit(api_url, key, webhook_url=url, webhook_events=["job.succeeded"])
    delivery = wait_state(api_url, key, job["id"], "job.succeeded", "gone")
    time.sleep(1.5)
    assert len(receiver.at(hook)) == 1 and delivery["attempts"] == 1


def test_redirects_are_not_followed(api_url: str, new_key: Key, receiver: Receiver) -> None:
    key = new_key()
    hook, target = path(), path()
    url = receiver.script(hook, (301, {"Location": receiver.url + target}), (204, {}))
    job = submit(api_url, key, webhook_url=url, webhook_events=["job.succeeded"])
    delivery = wait_state(api_url, key, job["id"], "job.succeeded", "delivered")
    assert receiver.at(target) == []
    assert delivery["history"][0]["status_code"] == 301
    assert "redirects are not followed" in delivery["history"][0]["error"]


def test_redeliver_sends_again_with_the_same_id(
    api_url: str, new_key: Key, receiver: Receiver
) -> None:
    key = new_key()
    hook = path()
    job = submit(api_url, key, webhook_url=receiver.url + hook, webhook_events=["job.succeeded"])
    first = receiver.wait_for(hook, 1)[0]
    response = httpx.post(f"{api_url}/v1/jobs/{job['id']}/webhook/redeliver", headers=auth(key))
    assert response.status_code == 202
    second = receiver.wait_for(hook, 2)[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.body == first.body


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",
        "ftp://example.com/hook",
    ],
)
def test_unsafe_urls_are_refused_at_submit(
    api_url: str, new_key: Key, keys: KeyStore, url: str
) -> None:
    key = new_key(10)
    response = httpx.post(
        f"{api_url}/v1/jobs", json={"prompt": "x", "webhook_url": url}, headers=auth(key)
    )
    assert response.status_code == 400
    assert response.json()["message"].startswith("webhook_url: ")
    assert keys.authenticate(key).credits == 10
    listed = httpx.get(f"{api_url}/v1/jobs", headers=auth(key)).json()
    assert listed["jobs"] == []


def test_unknown_events_are_refused(api_url: str, new_key: Key, receiver: Receiver) -> None:
    body = {"prompt": "x", "webhook_url": receiver.url + "/x", "webhook_events": ["job.exploded"]}
    response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=auth(new_key()))
    assert response.status_code == 400
    assert "unknown events ['job.exploded']" in response.json()["message"]
