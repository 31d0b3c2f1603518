"""Hotpot.ai's APIs, drop-in: Stable Diffusion at ``POST /stable-diffusion-{tier}`` and the
Image Generator at ``POST /make-art`` (tier ``art``).

The seed's Python example sends its fields with ``requests.post(files=...)``, so each field
arrives as a multipart *file* part; plain form fields and url-encoded bodies work too. An
input image (``seedImage``) comes as a file part of image bytes, or as base64 text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from common.errors import InvalidRequest, SdqError
from common.hotpot import ART_FIELDS, CREDITS_HEADER, FIELDS, HOTPOT_NAMES, IMAGE_FIELD
from common.job import JobRequest, JobStatus
from common.settings import Settings
from common.tiers import Tiers
from producer import images
from producer.api import openapi
from producer.api.deps import EventHub, Key, State
from producer.api.errors import describe
from producer.images import InitImage
from producer.waiter import wait_for_end

#: A file part that is base64 text (perhaps a data: URL) rather than image bytes.
_BASE64 = re.compile(rb"\s*(data:[\w/+.-]+;base64,)?[A-Za-z0-9+/=_\-\s]*")
#: The tier ``/make-art`` runs on; it has no ``/stable-diffusion-`` endpoint of its own.
ART_TIER = "art"
_FORMATS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}

_PROPERTIES: dict[str, Any] = {
    "inputText": {"type": "string", "description": "The prompt."},
    "guidanceScale": {"type": "number", "default": 7.5, "minimum": 0, "maximum": 30},
    "negativePrompt": {"type": "string"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295},
    "width": {
        "type": "integer",
        "description": "Multiple of 8; the model's size if omitted (with a `seedImage`, its "
        "size rounded down to multiples of 8).",
    },
    "height": {"type": "integer", "description": "Multiple of 8; as `width`."},
    "steps": {"type": "integer", "description": "Defaults to the tier's steps."},
    "outputFormat": {"type": "string", "enum": ["jpeg", "jpg", "png", "webp"]},
    "styleId": {
        "type": "string",
        "description": "A style's numeric id or its slug (`GET /v1/styles` lists them): it "
        "wraps the prompt and may set defaults.",
        "examples": ["3"],
    },
    "model": {
        "type": "string",
        "description": "A model the tier serves (`GET /v1/models`); the tier's default when "
        "omitted. Others are available upon request (403 for a key not entitled).",
        "examples": ["sd15"],
    },
    IMAGE_FIELD: {
        "type": "string",
        "format": "binary",
        "description": "Image-to-image: the input image, PNG, JPEG or WebP (a file part, or "
        "base64 text), at most `SDQ_MAX_INIT_IMAGE_BYTES` and `SDQ_MAX_INIT_IMAGE_SIDE` "
        "pixels a side.",
    },
    "promptStrength": {
        "type": "number",
        "default": 0.8,
        "minimum": 0,
        "maximum": 1,
        "description": "Image-to-image: how far from the `seedImage` to go (0 keeps it, 1 "
        "ignores it).",
    },
}


def _form_schema(names: dict[str, str]) -> dict[str, Any]:
    fields = [*names, IMAGE_FIELD]
    return {
        "type": "object",
        "required": ["inputText"],
        "properties": {name: _PROPERTIES[name] for name in fields},
    }


_RESPONSES: openapi.Responses = {
    200: {
        "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
        "description": "The image; `X-API-Credits-Left` tells the credits left.",
        "headers": {
            CREDITS_HEADER: {
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
        "names; an unknown `styleId` says how to list them; a `seedImage` that is not a PNG, "
        "JPEG or WebP, or is too large), or the body is neither multipart/form-data nor "
        "url-encoded. Nothing is charged.",
        "steps must be at most 50 on tier normal",
    ),
    403: openapi.MODEL_FORBIDDEN,
    409: openapi.IDEMPOTENCY_CONFLICT,
    413: openapi.error(
        413,
        "The form is over `SDQ_MAX_FORM_BODY_BYTES`, or over `SDQ_MAX_IMAGE_BODY_BYTES` with a "
        "`seedImage` (its part named within the first `SDQ_MAX_FORM_BODY_BYTES`).",
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


def _openapi_body(names: dict[str, str]) -> dict[str, Any]:
    schema = _form_schema(names)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": schema,
                    "encoding": {IMAGE_FIELD: {"contentType": "image/png, image/jpeg, image/webp"}},
                },
                "application/x-www-form-urlencoded": {"schema": schema},
            },
        }
    }


#: The longest a field may be, sent as a plain field or as a file part (Hotpot's own
#: ``inputText`` is far shorter). The input image has its own bounds.
MAX_FIELD_BYTES = 8 * 1024


@dataclass
class Form:
    """A Hotpot form: its known fields as text, and its input image as sent, if any
    (image bytes, or base64 text)."""

    fields: dict[str, str]
    image: bytes | str | None = None


async def read_form(request: Request, settings: Settings, names: dict[str, str] = FIELDS) -> Form:
    """The Hotpot fields of a multipart or url-encoded body: at most
    ``settings.max_form_fields`` parts, each at most ``MAX_FIELD_BYTES`` (400 naming the
    field) but the ``seedImage``, which is bounded as an image."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidRequest(
            "send the fields as multipart/form-data or application/x-www-form-urlencoded"
        )
    found = Form({})
    most = settings.max_form_fields
    image_chars = images.max_base64_chars(settings)
    # The seed's Python example sends every field as a file part: files count as fields. A
    # plain part may be as long as a base64 image; the others are held to MAX_FIELD_BYTES.
    form = request.form(max_files=most, max_fields=most, max_part_size=image_chars)
    async with form as parts:
        for name, value in parts.multi_items():
            if name == IMAGE_FIELD:
                found.image = await _image_part(value, settings, image_chars)
                continue
            if name not in names:
                continue  # Hotpot clients may send options sdq does not have.
            if isinstance(value, UploadFile):
                raw = await value.read(MAX_FIELD_BYTES + 1)
            else:
                raw = value.encode("utf-8", "surrogatepass")
            if len(raw) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"{name}: must be at most {MAX_FIELD_BYTES} bytes")
            try:
                found.fields[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"{name}: must be UTF-8 text") from None
    return found


async def _image_part(
    value: UploadFile | str, settings: Settings, chars: int
) -> bytes | str | None:
    """A ``seedImage`` as sent: image bytes, or base64 text; None when empty."""
    if not isinstance(value, UploadFile):
        return value.strip() or None
    raw = await value.read(chars + 1)
    if images.looks_raw(raw):
        if len(raw) > settings.max_init_image_bytes:
            raise InvalidRequest(
                f"{IMAGE_FIELD}: at most {settings.max_init_image_bytes} bytes "
                "(SDQ_MAX_INIT_IMAGE_BYTES)"
            )
        return raw
    if len(raw) > chars:
        raise InvalidRequest(
            f"{IMAGE_FIELD}: at most {settings.max_init_image_bytes} bytes "
            "(SDQ_MAX_INIT_IMAGE_BYTES)"
        )
    if not _BASE64.fullmatch(raw):
        return raw  # neither an image we take nor base64: decode() says so
    return raw.decode("ascii").strip() or None


def init_image(sent: bytes | str, settings: Settings) -> InitImage:
    """The form's input image, checked (400 naming ``seedImage``)."""
    if isinstance(sent, bytes):
        return images.decode(sent, settings, IMAGE_FIELD)
    return images.from_base64(sent, settings, IMAGE_FIELD)


def to_request(
    tier: str,
    fields: dict[str, str],
    tiers: Tiers | None = None,
    names: dict[str, str] = FIELDS,
) -> JobRequest:
    """The job a Hotpot form asks for; a field over its tier's limit in ``tiers`` is refused
    with that limit, as sdq's own bound on it would be."""
    if not fields.get("inputText", "").strip():
        raise InvalidRequest("inputText: is required")
    data: dict[str, Any] = {names[name]: value for name, value in fields.items() if name in names}
    if "output_format" in data:
        fmt = data["output_format"].strip().lower()
        if fmt not in _FORMATS:
            raise InvalidRequest("outputFormat: must be one of jpeg, png, webp")
        data["output_format"] = _FORMATS[fmt]
    data["tier"] = tier
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc, HOTPOT_NAMES, tiers=tiers, body=data)) from None


def _endpoint(tier: str, names: dict[str, str]) -> Any:
    async def generate(request: Request, state: State, hub: EventHub, key: Key) -> Response:
        form = await read_form(request, state.settings, names)
        job_request = to_request(tier, form.fields, state.tiers, names)
        seed_image = None
        if form.image is not None:
            seed_image = await run_in_threadpool(init_image, form.image, state.settings)
        # The wait's slot before the charge: a wait refused (429, 503) costs nothing.
        async with hub.open(key.id) as sub:
            submitted = await state.jobs.submit_async(
                key,
                [job_request],
                idempotency_key=request.headers.get("idempotency-key"),
                init_images=[seed_image],
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
                CREDITS_HEADER: str(credits),
                "X-Job-Id": job.id,
                "X-Seed": str(image.seed),
            },
        )

    return generate


_SYNC = (
    "Queues a job, waits for it and answers with the image bytes. A job that outlives the "
    "wait limit answers 504 with its `job_id`; fetch it later from `GET /v1/jobs/{id}`. "
    "`styleId` wraps the prompt in a style; a `seedImage` makes it image-to-image at "
    "`promptStrength`, its output the input's size unless `width` and `height` say otherwise. "
    "Fields it does not know are ignored."
)


def router_for(tiers: Tiers) -> APIRouter:
    """One ``POST /stable-diffusion-<tier>`` per tier, and ``POST /make-art`` on the art
    tier (which has no other); any other path is a plain 404."""
    router = APIRouter(tags=["Hotpot-compatible"])
    for tier in tiers:
        if tier.name == ART_TIER:
            continue
        router.add_api_route(
            f"/stable-diffusion-{tier.name}",
            _endpoint(tier.name, FIELDS),
            methods=["POST"],
            name=f"stable_diffusion_{tier.name}",
            summary=f"Generate an image on the {tier.name} tier (Hotpot-compatible, synchronous)",
            description=f"{tier.description} {tier.price} credit(s) per image. {_SYNC}",
            response_class=Response,
            responses=_RESPONSES,
            openapi_extra=_openapi_body(FIELDS),
        )
    if ART_TIER in tiers.names:
        art = tiers.get(ART_TIER)
        router.add_api_route(
            "/make-art",
            _endpoint(ART_TIER, ART_FIELDS),
            methods=["POST"],
            name="make_art",
            summary="Generate art with a style (Hotpot's Image Generator API, synchronous)",
            description=(
                f"Drop-in for Hotpot's Image Generator API, on the {ART_TIER} tier: "
                f"{art.price} credit(s) per image. {_SYNC}"
            ),
            response_class=Response,
            responses=_RESPONSES,
            openapi_extra=_openapi_body(ART_FIELDS),
        )
    return router
