"""Input images for image-to-image, checked at the edge before anything is charged.

An input must decode as PNG, JPEG or WebP within ``SDQ_MAX_INIT_IMAGE_BYTES`` and
``SDQ_MAX_INIT_IMAGE_SIDE``; its size is read from the header before a pixel is decoded, so
a small file that claims gigapixels (a decompression bomb) costs nothing. What is stored is
its first frame re-encoded as PNG, upright and without metadata (EXIF, GPS, ICC, text).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import InvalidRequest
from common.settings import Settings
from common.storage import S3Storage, Storage

log = logging.getLogger(__name__)

#: What Pillow calls the formats an input may be in (a camera's JPEG, MPO, opens as JPEG).
FORMATS = ("PNG", "JPEG", "WEBP")
#: The smallest side an input may have: a job's width and height start at 64.
MIN_SIDE = 64
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


@dataclass(frozen=True)
class InitImage:
    """An input image that passed the checks, ready to store."""

    png: bytes
    width: int
    height: int
    #: The digest of the bytes as sent: an Idempotency-Key compares it, not the image.
    sha256: str
    #: The field it came in, as the client named it (``init_image``, ``seedImage``).
    field: str = "init_image"

    @property
    def output_size(self) -> tuple[int, int]:
        """The output's size when the job names none: the input's, rounded down to
        multiples of 8."""
        return self.width // 8 * 8, self.height // 8 * 8


def input_key(settings: Settings, job_id: str) -> str:
    """Where a job's input image is stored, next to its outputs."""
    return f"{settings.s3_prefix.strip('/')}/{job_id}/input.png"


def looks_raw(data: bytes) -> bool:
    """Whether ``data`` starts as a PNG, JPEG or WebP file does (else it may be base64)."""
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def max_base64_chars(settings: Settings) -> int:
    """The longest base64 text of an image within ``max_init_image_bytes`` (a data: URL
    prefix and line breaks included)."""
    return (settings.max_init_image_bytes + 2) // 3 * 4 * 65 // 64 + 256


def from_base64(text: str, settings: Settings, field: str = "init_image") -> InitImage:
    """An image sent as base64 (standard or URL-safe alphabet, padded or not, optionally a
    ``data:image/...;base64,`` URL)."""
    text = text.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest(f"{field}: a data: URL must be base64 (data:image/png;base64,...)")
    if len(text) > max_base64_chars(settings):
        raise _too_big(field, settings)
    compact = "".join(text.split())
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: must be a PNG, JPEG or WebP image as base64") from None
    return decode(data, settings, field)


def decode(data: bytes, settings: Settings, field: str = "init_image") -> InitImage:
    """Check an image's bytes and re-encode it as PNG; InvalidRequest, naming ``field``,
    for anything else."""
    if len(data) > settings.max_init_image_bytes:
        raise _too_big(field, settings)
    not_an_image = InvalidRequest(f"{field}: not a valid PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            # The side cap below is the bomb guard; Pillow's own warning would be logged.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size  # from the header: nothing decoded yet
            _check_size(field, width, height, settings)
            image.seek(0)  # an animated PNG or WebP: its first frame
            image.load()
            upright = ImageOps.exif_transpose(image)
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        # Pillow's own cap, far above ours, refused the header before we could read it.
        raise InvalidRequest(
            f"{field}: at most {settings.max_init_image_side} pixels a side "
            "(SDQ_MAX_INIT_IMAGE_SIDE), this one is far larger"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise not_an_image from None
    width, height = upright.size
    # A fresh RGB image (transparency over white): none of the input's metadata (EXIF, ICC
    # profile, text chunks) travels with it.
    clean = Image.new("RGB", upright.size, "white")
    if "A" in upright.getbands() or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        clean.paste(rgba, mask=rgba.getchannel("A"))
    else:
        clean.paste(upright.convert("RGB"))
    out = io.BytesIO()
    clean.save(out, format="PNG", compress_level=3)
    return InitImage(out.getvalue(), width, height, hashlib.sha256(data).hexdigest(), field)


def _check_size(field: str, width: int, height: int, settings: Settings) -> None:
    side = settings.max_init_image_side
    if width > side or height > side:
        raise InvalidRequest(
            f"{field}: at most {side} pixels a side (SDQ_MAX_INIT_IMAGE_SIDE), "
            f"this one is {width}x{height}"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InvalidRequest(
            f"{field}: at least {MIN_SIDE} pixels a side, this one is {width}x{height}"
        )


def _too_big(field: str, settings: Settings) -> InvalidRequest:
    return InvalidRequest(
        f"{field}: at most {settings.max_init_image_bytes} bytes (SDQ_MAX_INIT_IMAGE_BYTES)"
    )


def store(storage: Storage, key: str, image: InitImage) -> None:
    """Upload a job's input before the job is charged: a worker may take it at once."""
    storage.put(key, image.png, "image/png", {"sha256": image.sha256})


def remove(storage: Storage, key: str) -> None:
    """Delete an input no job will read (its charge was refused, or an Idempotency-Key
    replayed). Best effort: a leftover is logged, never raised over the refusal."""
    try:
        delete = getattr(storage, "delete", None)
        if callable(delete):
            delete(key)
        elif isinstance(storage, S3Storage):
            storage.client.delete_object(Bucket=storage.bucket, Key=key)
    except Exception as exc:  # boto raises several types
        log.warning("could not delete the unused input %s: %s", key, exc)
