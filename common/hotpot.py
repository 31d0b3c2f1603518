"""Hotpot.ai's wire contract, spoken by the API (``producer/api/hotpot.py``) and by the remote
fallback (``workers/remote.py``): the form's field names, the credits header and the error
body. One definition, so what sdq serves is what its own fallback sends and reads."""

from __future__ import annotations

import json
from typing import Any

#: Hotpot's field names -> sdq's, on the Stable Diffusion endpoints.
FIELDS = {
    "inputText": "prompt",
    "guidanceScale": "guidance_scale",
    "negativePrompt": "negative_prompt",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "outputFormat": "output_format",
    "styleId": "style",
    "model": "model",
    "promptStrength": "strength",
}
#: The Image Generator's (``/make-art``): no steps or model, the art tier chooses.
ART_FIELDS = {
    name: FIELDS[name]
    for name in (
        "inputText",
        "styleId",
        "negativePrompt",
        "promptStrength",
        "width",
        "height",
        "seed",
        "guidanceScale",
        "outputFormat",
    )
}
#: The input image of image-to-image: a file part of image bytes, or base64 text.
IMAGE_FIELD = "seedImage"
#: sdq's field names -> Hotpot's, for messages that name what the client sent.
HOTPOT_NAMES = {ours: theirs for theirs, ours in FIELDS.items()} | {"init_image": IMAGE_FIELD}
#: The header of a 200 that tells the key's credits after the image.
CREDITS_HEADER = "X-API-Credits-Left"


def form(**values: object) -> dict[str, str]:
    """sdq's named values (``prompt=``, ``guidance_scale=``...) as Hotpot's form fields,
    leaving out those that are ``None`` or empty."""
    return {
        HOTPOT_NAMES[name]: str(value)
        for name, value in values.items()
        if value is not None and value != ""
    }


def error_body(status: int, message: str, **details: object) -> dict[str, Any]:
    """An error answer's JSON: ``{"code": N, "message": "..."}`` and any extra fields."""
    return {"code": status, "message": message, **details}


def error_message(body: bytes, limit: int = 200) -> str:
    """The ``message`` of an error answer, or the start of its text when it has none."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])[:limit]
    return body[:limit].decode("utf-8", "replace")
