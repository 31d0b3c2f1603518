"""Image encoding for upload."""

from __future__ import annotations

import io

from PIL import Image

from common.job import CONTENT_TYPES


def encode(image: Image.Image, output_format: str) -> tuple[bytes, str]:
    """The image's bytes in ``output_format`` (jpeg, png, webp) and their content type."""
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue(), CONTENT_TYPES[output_format]
