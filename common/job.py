"""The job: its request, its status, its results. One typed model, validated at the edge."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OutputFormat = Literal["jpeg", "png", "webp"]
MAX_SEED = 2**32 - 1

#: Bounds on a job's ``metadata``: it is stored once with the job and returned with it.
MAX_METADATA_BYTES = 4096
MAX_METADATA_KEYS = 64
MAX_METADATA_DEPTH = 4

CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

#: The event each status change emits, on SSE and to webhooks.
EVENT_TYPES = {
    JobStatus.QUEUED: "job.queued",
    JobStatus.RUNNING: "job.started",
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELED: "job.canceled",
}
#: The events after which a job emits no more: its SSE stream ends with one of them.
TERMINAL_EVENTS = frozenset(EVENT_TYPES[status] for status in TERMINAL)


class ErrorCode(StrEnum):
    """Why a job failed, stable for clients to branch on; ``Job.error`` says it in plain
    words, without the internals (endpoints, paths, exception text), which go to the logs."""

    GENERATION_FAILED = "generation_failed"
    OUT_OF_MEMORY = "out_of_memory"
    TIMED_OUT = "timed_out"
    REMOTE_FAILED = "remote_failed"
    INVALID_REQUEST = "invalid_request"
    MODEL_UNAVAILABLE = "model_unavailable"
    STORAGE_FAILED = "storage_failed"
    #: Its worker was lost (killed, its node gone) on every delivery.
    LOST = "lost"


PROGRESS = "job.progress"
ALL_EVENTS = [*EVENT_TYPES.values(), PROGRESS]
#: What a webhook receives when the job names no ``webhook_events``: every status change.
DEFAULT_WEBHOOK_EVENTS = list(EVENT_TYPES.values())


class JobRequest(BaseModel):
    """What a client asks for. Limits that depend on the tier are checked by the tier."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    tier: str = "normal"
    guidance_scale: float = Field(7.5, ge=0, le=30)
    steps: int | None = Field(None, ge=1, le=200, description="Defaults to the tier's steps.")
    width: int | None = Field(
        None, ge=64, le=4096, description="Multiple of 8; defaults to the model's native size."
    )
    height: int | None = Field(None, ge=64, le=4096)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when omitted.")
    num_images: int = Field(1, ge=1, le=8)
    output_format: OutputFormat = "jpeg"
    webhook_url: str | None = Field(
        None, max_length=2048, description="Receives signed Standard Webhooks events."
    )
    webhook_events: list[str] | None = Field(
        None, description="Events to send (default: every status change, no progress)."
    )
    priority: int = Field(5, ge=0, le=9, description="9 runs first within a tier.")
    allow_remote: bool = Field(
        True, description="May go to the tier's remote API (where the operator opted in)."
    )
    model: str | None = Field(
        None,
        max_length=32,
        description="A model id (GET /v1/tiers lists each tier's); the tier's default when "
        "omitted. Models other than the default are served to keys entitled to them.",
    )
    style: int | str | None = Field(
        None, description="A style's id or slug (GET /v1/styles lists them)."
    )
    init_image: str | None = Field(
        None,
        description="Image-to-image: the input image (PNG, JPEG or WebP) as base64. The output "
        "has its size, rounded to multiples of 8, unless width and height say otherwise.",
    )
    strength: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Image-to-image: how far from the input to go (0 keeps it, 1 ignores it).",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Yours, returned with the job: at most {MAX_METADATA_BYTES} bytes as "
        f"JSON, {MAX_METADATA_KEYS} keys in all, nested {MAX_METADATA_DEPTH} deep.",
    )

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        keys = _count_keys(value, depth=1)
        if keys > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys in all, got {keys}")
        size = len(_utf8_json(value))
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"at most {MAX_METADATA_BYTES} bytes as JSON, got {size}")
        return value

    @model_validator(mode="after")
    def _unicode_text(self) -> JobRequest:
        # JSON may spell lone surrogates ("\ud800"), which no UTF-8 store or receiver takes.
        _utf8_json(self.model_dump(mode="json"))
        return self

    @field_validator("webhook_events")
    @classmethod
    def _known_events(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            unknown = sorted(set(value) - set(ALL_EVENTS))
            if unknown:
                raise ValueError(f"unknown events {unknown}; choose from {ALL_EVENTS}")
            return list(dict.fromkeys(value))
        return value

    @field_validator("style")
    @classmethod
    def _bounded_style(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str) and len(value) > 48:
            raise ValueError("at most 48 characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_eight(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value


def _count_keys(value: Any, depth: int) -> int:
    if isinstance(value, dict):
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"nested more than {MAX_METADATA_DEPTH} deep")
        return len(value) + sum(_count_keys(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"nested more than {MAX_METADATA_DEPTH} deep")
        return sum(_count_keys(item, depth + 1) for item in value)
    return 0


def _utf8_json(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "text must be valid Unicode: lone surrogates such as \\ud800 are not allowed"
        ) from None


class ImageResult(BaseModel):
    """One stored image of a finished job."""

    index: int
    key: str
    content_type: str
    size_bytes: int
    sha256: str
    seed: int
    width: int
    height: int
    url: str | None = None


class Job(BaseModel):
    """A job record as the job store keeps it and the API returns it."""

    id: str
    key_id: str
    tier: str
    status: JobStatus
    request: JobRequest
    seed: int
    steps: int
    cost: int
    priority: int = Field(
        5, description="The priority it runs at: the request's, capped at the key's maximum."
    )
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    refunded: bool = False
    backend: Literal["local", "remote"] | None = None
    remote_reason: str | None = Field(None, description="Why the remote API served it.")
    model: str | None = Field(None, description="What ran it: the model's source, or remote:host.")
    model_id: str = Field("sdxl", description="The model it asked for, from the models file.")
    lane: str = Field("", description="Where it waits: its tier, or tier.model.")
    style: str | None = Field(None, description="The slug of its style.")
    prompt: str | None = Field(None, description="The prompt it runs with, after its style.")
    negative_prompt: str | None = Field(
        None, description="The negative prompt it runs with, after its style."
    )
    init_image_key: str | None = Field(None, description="Image-to-image: its input's object.")
    images: list[ImageResult] = Field(default_factory=list)
    error: str | None = Field(None, description="Why it failed, in plain words.")
    error_code: ErrorCode | None = Field(
        None, description="Why it failed, as a stable code (see ErrorCode)."
    )
    progress: dict[str, int] | None = None
    batch_id: str | None = None


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def now() -> float:
    return time.time()
