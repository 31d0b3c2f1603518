"""The async JSON API under ``/v1``."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from common.errors import NotFound
from common.job import Job, JobRequest
from producer.api.deps import Key, State
from producer.api.state import AppState

router = APIRouter(prefix="/v1", tags=["Jobs"])


class JobView(Job):
    """A job as its owner sees it, with presigned URLs for its images."""

    credits_left: int | None = None


class Account(BaseModel):
    id: str
    name: str
    credits: int
    webhook_secret: str


def view(state: AppState, job: Job, credits_left: int | None = None) -> JobView:
    images = [
        image.model_copy(update={"url": state.storage.url(image.key)}) for image in job.images
    ]
    data = job.model_dump() | {"images": images, "credits_left": credits_left}
    return JobView.model_validate(data)


def owned_job(state: AppState, key_id: str, job_id: str) -> Job:
    """The job if this key owns it: another key's job is as absent as a missing one."""
    job = state.store.get(job_id)
    if job.key_id != key_id:
        raise NotFound(f"no job {job_id}")
    return job


@router.post("/jobs", status_code=202, response_model=JobView, response_model_exclude={"key_id"})
async def create_job(body: JobRequest, state: State, key: Key) -> JobView:
    """Queue a job; poll ``GET /v1/jobs/{id}`` for its result."""
    job, credits = await run_in_threadpool(state.jobs.submit, key, body)
    return view(state, job, credits)


@router.get("/jobs/{job_id}", response_model=JobView, response_model_exclude={"key_id"})
def get_job(job_id: str, state: State, key: Key) -> JobView:
    """A job, with presigned URLs for its images once it has succeeded."""
    return view(state, owned_job(state, key.id, job_id))


@router.get("/account", response_model=Account, tags=["Account"])
def account(state: State, key: Key) -> Account:
    """The key's credits and its webhook signing secret."""
    current = state.keys.get(key.id)
    return Account(
        id=current.id,
        name=current.name,
        credits=current.credits,
        webhook_secret=current.webhook_secret,
    )
