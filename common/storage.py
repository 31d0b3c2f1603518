"""Object storage for images: S3-compatible through boto3; a local directory for unit tests."""

from __future__ import annotations

import logging
import math
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

#: The bucket lifecycle rule sdq keeps; other rules of the bucket are left alone.
LIFECYCLE_RULE_ID = "sdq-images-expire"
#: S3's DeleteObjects takes at most this many keys a call.
_DELETE_BATCH = 1000


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

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def expire_prefix(self, prefix: str, seconds: int) -> bool: ...


def object_key(prefix: str, job_id: str, index: int, extension: str) -> str:
    """``<prefix>/<job_id>/<n>.<ext>``: deterministic, so a retried upload overwrites."""
    return f"{prefix.strip('/')}/{job_id}/{index}.{extension}"


def job_prefix(prefix: str, job_id: str) -> str:
    """Where every object of a job lies: its images and its image-to-image input."""
    return f"{prefix.strip('/')}/{job_id}/"


def lifecycle_days(seconds: int) -> int:
    """The days of the lifecycle rule that backs a TTL of ``seconds``: S3 counts whole days
    from an object's upload, and a day more leaves the exact expiry to the sweeper."""
    return math.ceil(seconds / 86400) + 1


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

    def delete(self, key: str) -> None:
        """Delete one object; one that is not there is no error (S3 answers 204 alike)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"delete of {key} failed: {exc}") from exc

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many there were."""
        deleted = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                for start in range(0, len(keys), _DELETE_BATCH):
                    batch = keys[start : start + _DELETE_BATCH]
                    answer = self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                    if answer.get("Errors"):
                        raise StorageError(f"delete under {prefix} failed: {answer['Errors'][0]}")
                    deleted += len(batch)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"delete under {prefix} failed: {exc}") from exc
        return deleted

    def expire_prefix(self, prefix: str, seconds: int) -> bool:
        """Keep a bucket lifecycle rule that expires objects under ``prefix`` a day after
        ``seconds`` (``lifecycle_days``), beside the bucket's other rules. False where the
        server has no lifecycle rules (or not this kind): the sweeper alone expires them."""
        days = lifecycle_days(seconds)
        rule = {
            "ID": LIFECYCLE_RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": prefix},
            "Expiration": {"Days": days},
        }
        try:
            rules = self._lifecycle_rules()
            if any(r == rule for r in rules):
                return True
            others = [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID]
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": [*others, rule]}
            )
            # Read back: a server may accept the call and keep nothing of it.
            kept = any(r.get("ID") == LIFECYCLE_RULE_ID for r in self._lifecycle_rules())
        except (BotoCoreError, ClientError) as exc:
            log.info("bucket %s has no lifecycle rules here (%s); the sweeper expires images",
                     self.bucket, exc)  # fmt: skip
            return False
        if kept:
            log.info("bucket %s: objects under %s expire after %d days", self.bucket, prefix, days)
        return kept

    def _lifecycle_rules(self) -> list[dict[str, Any]]:
        try:
            answer = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
                return []
            raise
        return list(answer.get("Rules", []))


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

    def delete(self, key: str) -> None:
        path = self._path(key)
        for file in (path, path.with_suffix(path.suffix + ".type")):
            file.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix)
        if not folder.is_dir():
            return 0
        count = sum(1 for file in folder.rglob("*") if file.is_file() and file.suffix != ".type")
        shutil.rmtree(folder)
        return count

    def expire_prefix(self, prefix: str, seconds: int) -> bool:
        return False  # a directory has no lifecycle rules: the sweeper expires its files


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "local":
        assert settings.local_storage_dir is not None  # checked by Settings
        return LocalStorage(settings.local_storage_dir)
    return S3Storage(settings)
