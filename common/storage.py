"""Object storage for images: S3-compatible through boto3; a local directory for unit tests."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from common.errors import NotFound, StorageError
from common.settings import Settings

log = logging.getLogger(__name__)


class Blob:
    def __init__(self, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        self.body = body
        self.content_type = content_type
        self.metadata = metadata


class Storage(Protocol):
    def ensure_bucket(self) -> None: ...

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    def get(self, key: str) -> Blob: ...

    def url(self, key: str) -> str: ...

    def ping(self) -> None: ...


def object_key(prefix: str, job_id: str, index: int, extension: str) -> str:
    """``<prefix>/<job_id>/<n>.<ext>``: deterministic, so a retried upload overwrites."""
    return f"{prefix.strip('/')}/{job_id}/{index}.{extension}"


class S3Storage:
    """A bucket on any S3-compatible server."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.ttl = settings.presign_ttl_seconds
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            # S3-compatible servers (SeaweedFS, MinIO, older Ceph) reject or ignore the
            # CRC checksums botocore >= 1.36 sends by default; send them only when required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
        )

        def client(endpoint: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=settings.s3_access_key,
                aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
                region_name=settings.s3_region,
                config=config,
            )

        self.client = client(settings.s3_endpoint_url)
        # botocore asks for "Expect: 100-continue" on every PUT with a body: one more round
        # trip, and the interim answer read a byte per syscall, about half of a small
        # image's upload. It only saves sending a large body to a server that refuses it;
        # ours are images of a few MB at most, so they go in one request.
        self.client.meta.events.unregister("before-call.s3", add_expect_header)
        # Presigned URLs carry the host in their signature, so they are signed for the
        # address clients use when it differs from the one workers use.
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.presigner = self.client if public == settings.s3_endpoint_url else client(public)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"bucket {self.bucket}: {exc}") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
            log.info("created bucket %s", self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise StorageError(f"create bucket {self.bucket}: {exc}") from exc

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, Metadata=metadata
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"upload of {key} failed: {exc}") from exc

    def get(self, key: str) -> Blob:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
            return Blob(obj["Body"].read(), obj["ContentType"], dict(obj.get("Metadata", {})))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key}") from exc
            raise StorageError(f"download of {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"download of {key} failed: {exc}") from exc

    def url(self, key: str) -> str:
        return str(
            self.presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.ttl
            )
        )

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"bucket {self.bucket}: {exc}") from exc


class LocalStorage:
    """Files in a directory. For unit tests only: never a silent default."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} escapes the storage root")
        return path

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(body)
        shutil.move(tmp, path)
        path.with_suffix(path.suffix + ".type").write_text(content_type)

    def get(self, key: str) -> Blob:
        path = self._path(key)
        if not path.exists():
            raise NotFound(f"no object {key}")
        content_type = path.with_suffix(path.suffix + ".type").read_text()
        return Blob(path.read_bytes(), content_type, {})

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"{self.root} is not a directory")


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "local":
        assert settings.local_storage_dir is not None  # checked by Settings
        return LocalStorage(settings.local_storage_dir)
    return S3Storage(settings)
