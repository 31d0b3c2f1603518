"""The async JSON API under ``/v1``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from common.apikeys import ApiKey
from common.job import TERMINAL_EVENTS, Job, JobRequest, JobStatus
from producer.api import openapi
from producer.api.deps import EventHub, Key, State
from producer.api.state import AppState
from producer.hub import RESYNC, Subscription
from producer.schemas import (
    Account,
    BatchView,
    JobPage,
    JobView,
    ModelList,
    ModelView,
    StyleList,
    StyleView,
    TierList,
    TierView,
)

# Every /v1 route takes a key: each documents 401, 403 and 429 (``openapi.KEYED``).
_KEYED = openapi.KEYED
_NO_JOB = openapi.error(404, "No job of this key has this id.", "no job job_0123")
_SUBMIT: openapi.Responses = {
    **_KEYED,
    **openapi.BODY_LIMITS,
    400: openapi.error(
        400,
        "The request is invalid, or over its tier's limits: the message names each bad field "
        "(an unknown `style` says how to list them; an `init_image` that is not a PNG, JPEG or "
        "WebP, or is over `SDQ_MAX_INIT_IMAGE_BYTES` or `SDQ_MAX_INIT_IMAGE_SIDE`). Nothing is "
        "charged.",
        "steps must be at most 30 on tier budget",
    ),
    403: openapi.MODEL_FORBIDDEN,
    409: openapi.IDEMPOTENCY_CONFLICT,
    429: openapi.SUBMIT_REFUSED,
    503: openapi.QUEUE_DOWN,
}

# A quiet stream re-reads its job this often (an expired channel must not hang it).
_QUIET_SECONDS = 15.0

# Tags per route, not on the router: a route with two tags shows twice in Swagger UI.
router = APIRouter(prefix="/v1")

IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        description="Retry-safe submits: the same key and body return the same job(s) and "
        "charge once; the same key with another body answers 409.",
    ),
]


class BatchRequest(BaseModel):
    jobs: list[JobRequest] = Field(min_length=1, max_length=500)


def view(
    state: AppState, job: Job, credits_left: int | None = None, *, webhooks: bool = False
) -> JobView:
    expire_at = None
    if job.status is JobStatus.SUCCEEDED and job.finished_at is not None:
        expire_at = job.finished_at + state.settings.effective_image_ttl
    # Past its TTL an image is swept, or about to be: no URL that would answer 404.
    live = expire_at is None or expire_at > time.time()
    images = [
        image.model_copy(update={"url": state.storage.url(image.key) if live else None})
        for image in job.images
    ]
    deliveries = state.deliveries.for_job(job.id) if webhooks else []
    data = job.model_dump() | {
        "images": images,
        "images_expire_at": expire_at,
        "credits_left": credits_left,
        "webhooks": deliveries,
    }
    return JobView.model_validate(data)


def replay_headers(response: Response, replayed: bool) -> None:
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"


def credits_header(response: Response, credits: int | None) -> None:
    """``X-API-Credits-Left``, as the Hotpot endpoints send it, on answers that charged or
    refunded the key."""
    if credits is not None:
        response.headers["X-API-Credits-Left"] = str(credits)


#: The 202 of a submit, and the 200 of a cancel: the credits left, in a header too.
_CHARGED = {"description": "Accepted.", "headers": openapi.CREDITS_LEFT}


# The submits are async: the create script runs on the asyncio client, where a sync handler
# would pay two thread-pool hops (the handler, then FastAPI's response validation).
@router.post(
    "/jobs",
    status_code=202,
    response_model=JobView,
    tags=["Jobs"],
    responses={**_SUBMIT, 413: openapi.IMAGE_BODY_LIMIT, 202: _CHARGED},
)
async def create_job(
    body: JobRequest,
    state: State,
    key: Key,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobView:
    """Queue a job. Follow it with `GET /v1/jobs/{id}`, its events, or its webhook.

    `style` (an id or slug of `GET /v1/styles`) wraps the prompt; the job shows the prompt it
    runs. `model` picks one of the tier's models (`GET /v1/models`): other than the tier's
    default, only for keys entitled to it (403 otherwise). `init_image` (base64 PNG, JPEG or
    WebP) makes it image-to-image at `strength`: the output takes the input's size, rounded
    down to multiples of 8, unless `width` and `height` say otherwise. The input is stored
    under the job (`init_image_key`), re-encoded as PNG without its metadata."""
    submitted = await state.jobs.submit_async(key, [body], idempotency_key=idempotency_key)
    replay_headers(response, submitted.replayed)
    # A replay charged nothing: the credits the key had when this request came in.
    credits_header(response, key.credits if submitted.credits is None else submitted.credits)
    return view(state, submitted.jobs[0], submitted.credits)


@router.get(
    "/jobs",
    response_model=JobPage,
    tags=["Jobs"],
    responses={
        **_KEYED,
        400: openapi.error(
            400,
            "A query parameter is invalid.",
            "limit: Input should be greater than or equal to 1",
        ),
    },
)
def list_jobs(
    state: State,
    key: Key,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobPage:
    """Your jobs, newest first."""
    jobs, next_cursor = state.store.list_for_key(key.id, limit=limit, offset=cursor, status=status)
    return JobPage(jobs=[view(state, job) for job in jobs], next_cursor=next_cursor)


@router.get(
    "/jobs/{job_id}", response_model=JobView, tags=["Jobs"], responses={**_KEYED, 404: _NO_JOB}
)
def get_job(job_id: str, state: State, key: Key) -> JobView:
    """A job, with presigned image URLs once it has succeeded and its webhook attempts."""
    return view(state, state.jobs.owned(key, job_id), webhooks=True)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobView,
    tags=["Jobs"],
    responses={
        **_KEYED,
        404: _NO_JOB,
        409: openapi.error(409, "The job has ended already.", "job job_0123 is already succeeded"),
        200: {"description": "Canceled and refunded.", "headers": openapi.CREDITS_LEFT},
    },
)
def cancel_job(job_id: str, state: State, key: Key, response: Response) -> JobView:
    """Cancel a queued job at once; a running one stops within 0.1 s and one denoising
    step (the worker reports steps in batches, at most 0.1 s apart, and learns of the
    cancel from the store's answer). The job's credits are refunded. A job that already
    ended answers 409."""
    outcome = state.jobs.cancel(key, job_id)
    credits = outcome.credits if outcome.credits >= 0 else None
    credits_header(response, credits)
    return view(state, state.store.get(job_id), credits, webhooks=True)


@router.delete(
    "/jobs/{job_id}",
    status_code=204,
    response_class=Response,
    tags=["Jobs"],
    responses={
        **_KEYED,
        404: _NO_JOB,
        503: openapi.error(
            503,
            "The object storage did not answer: nothing was deleted (a queued or running job "
            "was canceled); try again.",
            "the object storage is unavailable: the job's images were not deleted; try again",
        ),
    },
)
def delete_job(job_id: str, state: State, key: Key) -> Response:
    """Delete the job, its events, its webhook deliveries, its images and its input image:
    a later `GET` answers 404 and its presigned URLs stop working. A queued or running job
    is canceled first and refunded once (as `POST /v1/jobs/{id}/cancel` does). Without a
    delete, a job's images go `SDQ_IMAGE_TTL_SECONDS` after it succeeded, and at once when
    it failed or was canceled."""
    state.jobs.delete(key, job_id)
    return Response(status_code=204)


@router.post(
    "/jobs/{job_id}/webhook/redeliver",
    status_code=202,
    response_model=JobView,
    tags=["Jobs"],
    responses={
        **_KEYED,
        404: _NO_JOB,
        429: openapi.error(
            429,
            "Over the key's request rate, or this job's webhooks were redelivered less than "
            "`SDQ_WEBHOOK_REDELIVER_INTERVAL_SECONDS` ago; `Retry-After` says when to retry.",
            "this job's webhooks were redelivered less than 60 s ago; try again in 42.0 s",
            headers=openapi.RATE_HEADERS,
        ),
    },
)
def redeliver(job_id: str, state: State, key: Key) -> JobView:
    """Send the job's webhook events again, with their original `webhook-id`s."""
    job = state.jobs.owned(key, job_id)
    state.deliveries.redeliver(job.id)
    return view(state, job, webhooks=True)


def owned_job_id(job_id: str, state: State, key: Key) -> str:
    """A dependency, so that a stream checks ownership before its 200 goes out."""
    return state.jobs.owned(key, job_id).id


LastEventId = Annotated[
    int,
    Header(
        ge=0,
        le=10**9,
        description="Resume after this event's `id` (its sequence number).",
    ),
]


@dataclass
class Stream:
    job_id: str
    sub: Subscription
    after: int


async def open_stream(
    job_id: Annotated[str, Depends(owned_job_id)],
    hub: EventHub,
    key: Key,
    last_event_id: LastEventId = 0,
) -> AsyncIterator[Stream]:
    """The stream's slot (429 over the key's cap, 503 over the process's), subscribed
    before the 200 goes out and before the log is read, so nothing falls between the two;
    released when the response ends, however it ends."""
    async with hub.open(key.id) as sub:
        await sub.follow(job_id)
        yield Stream(job_id, sub, last_event_id)


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    tags=["Jobs"],
    responses={
        200: openapi.event_stream("The job's events, ending with its terminal one."),
        **_KEYED,
        400: openapi.error(
            400, "`Last-Event-ID` is not a sequence number.", "last-event-id: Input should be ..."
        ),
        404: _NO_JOB,
        429: openapi.error(
            429,
            "Over the key's request rate, or the key holds `SDQ_STREAMS_PER_KEY` streams and "
            "waits already; `Retry-After` says when to retry.",
            "too many open event streams for this key (20)",
            headers=openapi.RATE_HEADERS,
        ),
        503: openapi.STREAMS_FULL,
    },
)
async def job_events(
    stream: Annotated[Stream, Depends(open_stream)], state: State
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: every status change (`id` = its sequence number, so a client can
    resume with `Last-Event-ID`) and `job.progress` per denoising step, ending with the
    terminal event. A key holds at most `SDQ_STREAMS_PER_KEY` streams and Hotpot waits at
    once (429 beyond); a stream ends after `SDQ_STREAM_MAX_SECONDS`, to be resumed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.stream_max_seconds
    job_id, seen = stream.job_id, stream.after
    replay = True
    while True:
        if replay:
            # The log from the last event seen: at the start, and after the hub reconnected
            # to Redis (or this stream fell behind) and events may have been lost.
            for logged in await run_in_threadpool(state.store.events, job_id, seen):
                if logged["seq"] <= seen:
                    continue
                seen = logged["seq"]
                yield _sse(logged)
                if _terminal(logged):
                    return
            replay = False
        remaining = deadline - loop.time()
        if remaining <= 0:
            return  # the client resumes with Last-Event-ID
        event = await stream.sub.next(min(_QUIET_SECONDS, remaining))
        if event is None:
            job = await run_in_threadpool(state.store.get, job_id)
            if job.status.terminal:
                for logged in await run_in_threadpool(state.store.events, job_id, seen):
                    yield _sse(logged)
                return
            continue
        if event is RESYNC:
            replay = True
            continue
        if "seq" in event:
            if event["seq"] <= seen:
                continue
            seen = event["seq"]
        yield _sse(event)
        if _terminal(event):
            return


def _sse(event: dict[str, Any]) -> ServerSentEvent:
    seq = event.get("seq")
    return ServerSentEvent(data=event, event=event["type"], id=None if seq is None else str(seq))


def _terminal(event: dict[str, Any]) -> bool:
    return event["type"] in TERMINAL_EVENTS


@router.post(
    "/batches",
    status_code=202,
    response_model=BatchView,
    tags=["Batches"],
    responses={
        **_SUBMIT,
        400: openapi.error(
            400,
            "A job is invalid or over its tier's limits (the message names it, `jobs.3.steps`), "
            "or carries an `init_image`: image-to-image jobs go to `POST /v1/jobs` one by one.",
            "jobs.0.init_image: image-to-image is not accepted in batches; send each such job "
            "to POST /v1/jobs",
        ),
        413: openapi.error(
            413,
            "The body is over `SDQ_MAX_BATCH_BODY_BYTES`.",
            "request body too large: at most 4194304 bytes here",
        ),
        202: _CHARGED,
    },
)
async def create_batch(
    body: BatchRequest,
    state: State,
    key: Key,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> BatchView:
    """Queue many jobs at once: all are charged and queued, or none (429 when the credits
    do not cover them all)."""
    submitted = await state.jobs.submit_async(
        key, body.jobs, idempotency_key=idempotency_key, batch=True
    )
    replay_headers(response, submitted.replayed)
    credits_header(response, key.credits if submitted.credits is None else submitted.credits)
    assert submitted.batch_id is not None
    return await run_in_threadpool(batch_view, state, key, submitted.batch_id, submitted.credits)


@router.get(
    "/batches/{batch_id}",
    response_model=BatchView,
    tags=["Batches"],
    responses={
        **_KEYED,
        404: openapi.error(404, "No batch of this key has this id.", "no batch batch_0123"),
    },
)
def get_batch(batch_id: str, state: State, key: Key) -> BatchView:
    """A batch: its jobs and how many are in each status."""
    return batch_view(state, key, batch_id)


def batch_view(
    state: AppState, key: ApiKey, batch_id: str, credits_left: int | None = None
) -> BatchView:
    record, jobs = state.jobs.batch(key, batch_id)
    present = [job for job in jobs if job is not None]
    counts = {status.value: 0 for status in JobStatus}
    for job in present:
        counts[job.status.value] += 1
    return BatchView(
        id=batch_id,
        created_at=float(record["created_at"]),  # type: ignore[arg-type]
        total=len(jobs),
        counts=counts,
        done=all(job.status.terminal for job in present),
        credits_left=credits_left,
        jobs=[view(state, job) for job in present],
    )


@router.get("/account", response_model=Account, tags=["Account"], responses=_KEYED)
def account(state: State, key: Key) -> Account:
    """The key's credits, its limits and its webhook signing secret (`whsec_...`). After the
    operator rotated the secret, the previous one also signs deliveries until
    `previous_secret_expires_at`: switch your receiver to `webhook_secret` before then."""
    current = state.keys.get(key.id)
    s = state.settings
    return Account(
        id=current.id,
        name=current.name,
        credits=current.credits,
        webhook_secret=current.webhook_secret,
        previous_secret_expires_at=current.previous_expires(time.time()),
        rate=current.rate or s.default_rate_per_second,
        max_jobs=current.max_jobs or s.default_max_jobs,
        active_jobs=current.active,
        max_priority=s.default_max_priority
        if current.max_priority is None
        else current.max_priority,
    )


@router.get("/tiers", response_model=TierList, tags=["Account"], responses=_KEYED)
def tiers(state: State, key: Key) -> TierList:
    """The tiers this deployment serves, with their defaults, limits and price per image."""
    return TierList(tiers=[TierView.model_validate(tier.model_dump()) for tier in state.jobs.tiers])


@router.get("/styles", response_model=StyleList, tags=["Account"], responses=_KEYED)
def styles(state: State, key: Key) -> StyleList:
    """The styles a job may ask for by `style` (its id or slug; Hotpot's `styleId`): the
    prompt each wraps a job's prompt in, its negative prompt and the defaults it fills in."""
    return StyleList(styles=[StyleView.model_validate(s.model_dump()) for s in state.jobs.styles])


@router.get("/models", response_model=ModelList, tags=["Account"], responses=_KEYED)
def models(state: State, key: Key) -> ModelList:
    """The models served here: which tiers serve each, where each is every key's default,
    and whether this key is entitled to it elsewhere (other models are available upon
    request: `sdq keys create --models`)."""
    views = []
    for model in state.models:
        serving = [tier for tier in state.tiers if model.id in tier.models]
        default_on = [tier.name for tier in serving if tier.default_model == model.id]
        if not serving:
            continue  # declared, but no tier serves it here
        views.append(
            ModelView(
                id=model.id,
                name=model.name or model.id,
                family=model.family,
                native_side=model.native_side,
                tiers=[tier.name for tier in serving],
                default_on=default_on,
                entitled=all(key.may_use(model.id, tier.default_model) for tier in serving),
            )
        )
    return ModelList(models=views)
