"""Response shapes of the ``/v1`` API, shared by the API and the Python client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.job import Job
from common.webhooks import Delivery


class JobView(Job):
    """A job as its owner sees it: presigned URLs for its images, its webhook deliveries."""

    key_id: str = Field("", exclude=True)
    credits_left: int | None = Field(None, description="The key's credits after this call.")
    images_expire_at: float | None = Field(
        None,
        description="When its images are deleted and their URLs stop working (seconds since "
        "the epoch, `SDQ_IMAGE_TTL_SECONDS` after it succeeded); past it, `url` is null. Null "
        "until the job has succeeded.",
    )
    webhooks: list[Delivery] = Field(default_factory=list)


class JobPage(BaseModel):
    jobs: list[JobView]
    next_cursor: int | None = Field(None, description="Pass as `cursor` for the next page.")


class BatchView(BaseModel):
    id: str
    created_at: float
    total: int
    counts: dict[str, int] = Field(description="Jobs by status.")
    done: bool
    credits_left: int | None = None
    jobs: list[JobView]


class Account(BaseModel):
    id: str
    name: str
    credits: int
    webhook_secret: str = Field(description="Verifies the `webhook-signature` of your webhooks.")
    previous_secret_expires_at: float | None = Field(
        None,
        description="After a rotation of `webhook_secret`, deliveries are also signed with the "
        "previous secret until then (seconds since the epoch); null otherwise.",
    )
    rate: float = Field(description="Requests a second this key may make, in bursts of as many.")
    max_jobs: int = Field(description="Jobs it may have queued or running at once.")
    active_jobs: int = Field(description="Jobs it has queued or running now.")
    max_priority: int = Field(description="The highest priority its jobs run at.")


class TierView(BaseModel):
    """What a client may ask of a tier: its defaults, its limits and its price."""

    name: str
    description: str
    default_steps: int
    max_steps: int
    max_side: int = Field(description="The most pixels on either side.")
    max_images: int
    price: int = Field(description="Credits per image.")
    scheduler: str
    default_model: str = Field(description="The model a job gets when it names none.")
    models: list[str] = Field(
        description="Every model it serves; those other than the default to entitled keys."
    )


class TierList(BaseModel):
    tiers: list[TierView]


class StyleView(BaseModel):
    """A style: what it makes of a job's prompt, and the defaults it fills in."""

    id: int = Field(description="Hotpot's numeric `styleId`.")
    slug: str = Field(description="The same style by name: `style` takes either.")
    name: str
    prompt: str = Field(description="The prompt it runs: the job's prompt goes at `{prompt}`.")
    negative_prompt: str = Field(description="Joined to the job's negative prompt.")
    guidance_scale: float | None = Field(None, description="Its default, where a job sets none.")
    steps: int | None = Field(None, description="Its default (within the tier's maximum).")
    scheduler: str | None = None
    model: str | None = Field(None, description="Its default model, where a job names none.")


class StyleList(BaseModel):
    styles: list[StyleView]


class ModelView(BaseModel):
    """A model, where it is served, and whether this key may ask for it."""

    id: str = Field(description="What a job's `model` names.")
    name: str
    family: str = Field(description="The pipeline that runs it: sdxl, sd15 or sd21.")
    native_side: int = Field(description="Its width and height when a job names none.")
    tiers: list[str] = Field(description="The tiers that serve it.")
    default_on: list[str] = Field(description="The tiers where every key gets it.")
    entitled: bool = Field(
        description="This key may ask for it on every tier that serves it; otherwise only "
        "where it is the default (other models are available upon request)."
    )


class ModelList(BaseModel):
    models: list[ModelView]


class Event(BaseModel):
    """One server-sent event of a job."""

    type: str
    timestamp: str
    seq: int | None = None
    data: dict[str, Any]


class Error(BaseModel):
    """Every error answer: the HTTP status again and what went wrong. Some add context, such
    as the `job_id` of a job that failed or outlived the wait and the `credits_left`."""

    model_config = ConfigDict(extra="allow")

    code: int = Field(description="The HTTP status.")
    message: str = Field(description="What went wrong, and for a bad field, which one.")


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str] | None = Field(
        None, description="`ok`, or the error each check gave; to the admin token only."
    )
