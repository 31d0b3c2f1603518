"""S3 storage against a real SeaweedFS."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from common.errors import NotFound
from common.settings import Settings
from common.storage import S3Storage


def test_put_get_keeps_bytes_type_and_metadata(storage: S3Storage) -> None:
    body = bytes(range(256)) * 40
    storage.put("tests/roundtrip/0.png", body, "image/png", {"tier": "budget", "seed": "42"})
    blob = storage.get("tests/roundtrip/0.png")
    assert hashlib.sha256(blob.body).digest() == hashlib.sha256(body).digest()
    assert blob.content_type == "image/png"
    assert blob.metadata == {"tier": "budget", "seed": "42"}


def test_a_retried_upload_overwrites(storage: S3Storage) -> None:
    storage.put("tests/overwrite/0.jpg", b"first", "image/jpeg", {})
    storage.put("tests/overwrite/0.jpg", b"second", "image/jpeg", {})
    assert storage.get("tests/overwrite/0.jpg").body == b"second"


def test_presigned_urls_download_without_credentials(storage: S3Storage) -> None:
    storage.put("tests/presigned/0.jpg", b"\xff\xd8jpeg", "image/jpeg", {})
    url = storage.url("tests/presigned/0.jpg")
    assert "X-Amz-Signature=" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"\xff\xd8jpeg"
    tampered = url.replace("presigned/0.jpg", "presigned/1.jpg")
    assert httpx.get(tampered).status_code == 403


def test_missing_objects_are_not_found(storage: S3Storage) -> None:
    with pytest.raises(NotFound):
        storage.get("tests/never/0.jpg")


def test_urls_are_signed_for_the_public_endpoint(settings: Settings) -> None:
    public = settings.model_copy(update={"s3_public_endpoint_url": "https://images.example.com"})
    url = S3Storage(public).url("images/job_x/0.jpg")
    assert url.startswith("https://images.example.com/sdq-test/images/job_x/0.jpg?")


def test_small_uploads_go_in_one_request(storage: S3Storage) -> None:
    sent: list[dict[str, str]] = []
    storage.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
    )
    storage.put("tests/one-request.png", b"\x89PNG" * 1000, "image/png", {})
    assert storage.get("tests/one-request.png").body == b"\x89PNG" * 1000
    # No "Expect: 100-continue": it costs a round trip per image for nothing.
    assert len(sent) == 1 and "Expect" not in sent[0]
