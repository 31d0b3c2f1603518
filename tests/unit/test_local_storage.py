from pathlib import Path

import pytest

from common.errors import NotFound, StorageError
from common.storage import LocalStorage, object_key


def test_object_keys_are_deterministic() -> None:
    assert object_key("/images/", "job_1", 0, "jpg") == "images/job_1/0.jpg"


def test_local_backend_round_trip_and_containment(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "bucket")
    storage.ensure_bucket()
    storage.put("images/job_1/0.png", b"\x89PNG", "image/png", {})
    blob = storage.get("images/job_1/0.png")
    assert (blob.body, blob.content_type) == (b"\x89PNG", "image/png")
    with pytest.raises(NotFound):
        storage.get("images/job_1/1.png")
    with pytest.raises(StorageError, match="escapes"):
        storage.put("../outside.png", b"x", "image/png", {})
