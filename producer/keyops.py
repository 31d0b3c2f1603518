"""Operators' key operations, one interface over two ways: the admin API (``/admin/v1``, with
``SDQ_ADMIN_TOKEN``) or the job store directly, on a machine that reaches Redis. Both answer
with the admin API's shapes (plain JSON values), so ``sdq keys`` prints the same either way,
and both record each change in the audit log."""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from common.apikeys import KEY_ID, KEY_PREFIX, KeyChanges, KeyStore, operator
from common.errors import SdqError
from producer.client import _base_url, _raise_for, _reaching

Json = dict[str, Any]


class KeyOps(Protocol):
    """What ``sdq keys`` does; each method answers as the admin API route of the same name."""

    where: str

    def create(self, fields: Json) -> Json: ...
    def page(self, limit: int, cursor: str | None) -> Json: ...
    def show(self, key_or_id: str) -> Json: ...
    def update(self, key_or_id: str, changes: Json) -> Json: ...
    def revoke(self, key_or_id: str) -> Json: ...
    def rotate(self, key_or_id: str, overlap_seconds: float | None) -> Json: ...


def _rotated(record: Any) -> Json:
    info = record.info()
    return {
        "id": record.id,
        "webhook_secret": record.webhook_secret,
        "webhook_secret_rotated_at": record.webhook_secret_rotated_at,
        "previous_secret_expires_at": info.previous_secret_expires_at,
    }


class StoreOps:
    """Straight on the job store; the audit log names this machine's user."""

    def __init__(self, keys: KeyStore, *, free_credits: int, overlap_seconds: float) -> None:
        self.keys = keys
        self.free_credits = free_credits
        self.overlap_seconds = overlap_seconds
        self.actor = operator()
        self.where = "the job store"

    def create(self, fields: Json) -> Json:
        credits = fields.pop("credits", None)
        raw, record = self.keys.create(
            self.free_credits if credits is None else credits, actor=self.actor, **fields
        )
        return {"key": raw, **record.info().model_dump(mode="json")}

    def page(self, limit: int, cursor: str | None) -> Json:
        found, next_cursor = self.keys.page(limit=limit, cursor=cursor)
        return {
            "keys": [record.info().model_dump(mode="json") for record in found],
            "next_cursor": next_cursor,
        }

    def show(self, key_or_id: str) -> Json:
        return self.keys.find(key_or_id).info().model_dump(mode="json")

    def update(self, key_or_id: str, changes: Json) -> Json:
        record = self.keys.update(key_or_id, KeyChanges.model_validate(changes), actor=self.actor)
        return record.info().model_dump(mode="json")

    def revoke(self, key_or_id: str) -> Json:
        return self.keys.revoke(key_or_id, actor=self.actor).info().model_dump(mode="json")

    def rotate(self, key_or_id: str, overlap_seconds: float | None) -> Json:
        overlap = self.overlap_seconds if overlap_seconds is None else overlap_seconds
        return _rotated(self.keys.rotate_secret(key_or_id, overlap, actor=self.actor))


class ApiOps:
    """Over the admin API. Errors are raised as the Python client raises them
    (``producer.client.ApiError`` and friends), each with the API's own message."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = _base_url(url)
        self.where = f"the admin API at {self.url}"
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=self.url.join("/admin/v1/"),
            headers={"authorization": f"Bearer {token}", "user-agent": "sdq-cli"},
            timeout=timeout,
            trust_env=False,
        )

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Json:
        with _reaching(f"the sdq API at {self.url}", self.timeout):
            response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        answer: Json = response.json()
        return answer

    def _id(self, key_or_id: str) -> str:
        """A key's id; a key itself is looked up in a body, never sent in a URL."""
        if key_or_id.startswith(KEY_PREFIX):
            return str(self._call("POST", "keys/lookup", json={"key": key_or_id})["id"])
        if not KEY_ID.match(key_or_id):
            raise SdqError(f"no API key {key_or_id!r}: give the key itself or its id (key_...)")
        return key_or_id

    def create(self, fields: Json) -> Json:
        return self._call("POST", "keys", json=fields)

    def page(self, limit: int, cursor: str | None) -> Json:
        params: Json = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        return self._call("GET", "keys", params=params)

    def show(self, key_or_id: str) -> Json:
        return self._call("GET", f"keys/{self._id(key_or_id)}")

    def update(self, key_or_id: str, changes: Json) -> Json:
        return self._call("PATCH", f"keys/{self._id(key_or_id)}", json=changes)

    def revoke(self, key_or_id: str) -> Json:
        return self._call("POST", f"keys/{self._id(key_or_id)}/revoke")

    def rotate(self, key_or_id: str, overlap_seconds: float | None) -> Json:
        body = {} if overlap_seconds is None else {"overlap_seconds": overlap_seconds}
        return self._call("POST", f"keys/{self._id(key_or_id)}/rotate-secret", json=body)
