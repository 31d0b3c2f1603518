"""Hotpot.ai's Stable Diffusion API, drop-in: ``POST /stable-diffusion-{tier}``.

The seed's Python example sends its fields with ``requests.post(files=...)``, so each field
arrives as a multipart *file* part; plain form fields and url-encoded bodies work too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from common.errors import InvalidRequest, SdqError
from common.job import JobRequest, JobStatus
from common.tiers import Tiers
from producer.api import openapi
from producer.api.deps import EventHub, Key, State
from producer.api.errors import describe
from producer.waiter import wait_for_end

#: Hotpot's field names -> sdq's.
FIELDS = {
    "inputText": "prompt",
    "guidanceScale": "guidance_scale",
    "negativePrompt": "negative_prompt",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "outputFormat": "output_format",
}
_HOTPOT_NAMES = {ours: theirs for theirs, ours in FIELDS.items()}
_FORMATS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}

_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputText"],
    "properties": {
        "inputText": {"type": "string", "description": "The prompt."},
        "guidanceScale": {"type": "number", "default": 7.5, "minimum": 0, "maximum": 30},
        "negativePrompt": {"type": "string"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295},
        "width": {"type": "integer", "description": "Multiple of 8; the model's size if omitted"},
        "height": {"type": "integer", "description": "Multiple of 8; the model's size if omitted"},
        "steps": {"type": "integer", "description": "Defaults to the tier's steps."},
        "outputFormat": {"type": "string", "enum": ["jpeg", "jpg", "png", "webp"]},
    },
}
_RESPONSES: openapi.Responses = {
    200: {
        "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
        "description": "The image; `X-API-Credits-Left` tells the credits left.",
        "headers": {
            "X-API-Credits-Left": {
                "description": "The key's credits after this image.",
                "schema": {"type": "integer"},
            },
            "X-Job-Id": {"description": "The job that made it.", "schema": {"type": "string"}},
            "X-Seed": {"description": "Its seed.", "schema": {"type": "integer"}},
        },
    },
    **openapi.KEYED,
    **openapi.BODY_LIMITS,
    400: openapi.error(
        400,
        "A field is invalid or over the tier's limits (the message uses Hotpot's field "
        "names), or the body is neither multipart/form-data nor url-encoded.",
        "steps must be at most 50 on tier normal",
    ),
    409: openapi.IDEMPOTENCY_CONFLICT,
    413: openapi.error(
        413,
        "The form is over `SDQ_MAX_FORM_BODY_BYTES`.",
        "request body too large: at most 65536 bytes here",
    ),
    429: openapi.error(
        429,
        "Not enough credits (nothing was charged), too many jobs or waits at once, or over "
        "the key's request rate; `Retry-After` says when to retry, except for credits.",
        "not enough credits: this request costs 4, the key has 3",
        headers=openapi.RATE_HEADERS,
    ),
    500: openapi.error(
        500,
        "The job failed and was refunded; the body adds its `job_id` and `credits_left`.",
        "generation failed: CUDA out of memory",
    ),
    503: openapi.error(
        503,
        "This process holds as many waits as it may (`Retry-After` says when to retry), or "
        "the job queue or the object storage is unavailable.",
        "this API process has no room for another event stream; retry shortly",
        headers=openapi.RETRY_AFTER,
    ),
    504: openapi.error(
        504,
        "The job outlived `SDQ_SYNC_TIMEOUT_SECONDS`; it goes on: fetch it later from "
        "`GET /v1/jobs/{id}` with the body's `job_id`.",
        "job job_0123 is still running after 300s; GET /v1/jobs/job_0123 for its result",
    ),
}
_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _FORM_SCHEMA},
            "application/x-www-form-urlencoded": {"schema": _FORM_SCHEMA},
        },
    }
}


#: The longest a field may be, sent as a plain field or as a file part (Hotpot's own
#: ``inputText`` is far shorter).
MAX_FIELD_BYTES = 8 * 1024


async def read_fields(request: Request, max_fields: int) -> dict[str, str]:
    """The Hotpot fields of a multipart or url-encoded body, as text: at most ``max_fields``
    parts, each at most ``MAX_FIELD_BYTES`` (400 naming the field)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidRequest(
            "send the fields as multipart/form-data or application/x-www-form-urlencoded"
        )
    fields: dict[str, str] = {}
    # The seed's Python example sends every field as a file part: files count as fields.
    form = request.form(max_files=max_fields, max_fields=max_fields, max_part_size=MAX_FIELD_BYTES)
    async with form as parts:
        for name, value in parts.multi_items():
            if name not in FIELDS:
                continue  # Hotpot clients may send options sdq does not have.
            if isinstance(value, UploadFile):
                raw = await value.read(MAX_FIELD_BYTES + 1)
                if len(raw) > MAX_FIELD_BYTES:
                    raise InvalidRequest(f"{name}: must be at most {MAX_FIELD_BYTES} bytes")
                try:
                    fields[name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest(f"{name}: must be UTF-8 text") from None
            else:
                fields[name] = value
    return fields


def to_request(tier: str, fields: dict[str, str], tiers: Tiers | None = None) -> JobRequest:
    """The job a Hotpot form asks for; a field over its tier's limit in ``tiers`` is refused
    with that limit, as sdq's own bound on it would be."""
    if not fields.get("inputText", "").strip():
        raise InvalidRequest("inputText: is required")
    data: dict[str, Any] = {FIELDS[name]: value for name, value in fields.items()}
    if "output_format" in data:
        fmt = data["output_format"].strip().lower()
        if fmt not in _FORMATS:
            raise InvalidRequest("outputFormat: must be one of jpeg, png, webp")
        data["output_format"] = _FORMATS[fmt]
    data["tier"] = tier
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc, _HOTPOT_NAMES, tiers=tiers, body=data)) from None


def _endpoint(tier: str) -> Any:
    async def generate(request: Request, state: State, hub: EventHub, key: Key) -> Response:
        fields = await read_fields(request, state.settings.max_form_fields)
        job_request = to_request(tier, fields, state.tiers)
        # The wait's slot before the charge: a wait refused (429, 503) costs nothing.
        async with hub.open(key.id) as sub:
            submitted = await state.jobs.submit_async(
                key, [job_request], idempotency_key=request.headers.get("idempotency-key")
            )
            job_id = submitted.jobs[0].id
            await sub.follow(job_id)
            job = await wait_for_end(
                sub,
                state.store,
                job_id,
                state.settings.sync_timeout_seconds,
                disconnected=request.is_disconnected,
            )
        credits = await run_in_threadpool(state.keys.credits, key.id)
        if job.status is not JobStatus.SUCCEEDED:
            reason = job.error or f"the job was {job.status.value}"
            raise SdqError(f"generation failed: {reason}", job_id=job.id, credits_left=credits)
        image = job.images[0]
        blob = await run_in_threadpool(state.storage.get, image.key)
        return Response(
            content=blob.body,
            media_type=image.content_type,
            headers={
                "X-API-Credits-Left": str(credits),
                "X-Job-Id": job.id,
                "X-Seed": str(image.seed),
            },
        )

    return generate


def router_for(tiers: Tiers) -> APIRouter:
    """One ``POST /stable-diffusion-<tier>`` per tier; any other path is a plain 404."""
    router = APIRouter(tags=["Hotpot-compatible"])
    for tier in tiers:
        router.add_api_route(
            f"/stable-diffusion-{tier.name}",
            _endpoint(tier.name),
            methods=["POST"],
            name=f"stable_diffusion_{tier.name}",
            summary=f"Generate an image on the {tier.name} tier (Hotpot-compatible, synchronous)",
            description=(
                f"{tier.description} {tier.price} credit(s) per image. Queues a job, waits for "
                "it and answers with the image bytes. A job that outlives the wait limit "
                "answers 504 with its `job_id`; fetch it later from `GET /v1/jobs/{id}`."
            ),
            response_class=Response,
            responses=_RESPONSES,
            openapi_extra=_OPENAPI_BODY,
        )
    return router
