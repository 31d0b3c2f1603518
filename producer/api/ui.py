"""The playground and gallery at ``/ui``: static files, served without a key.

The page holds no secret: the key is typed into it and kept in the browser, and every call
it makes is an ordinary ``/v1`` request with that key. Its files are a fixed list, so no
path a client sends reaches the file system; each answer carries a strict
Content-Security-Policy (scripts from this origin only, images from here and from the S3
endpoint the presigned URLs name)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from common.errors import NotFound
from common.settings import Settings
from producer.api.deps import State

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

#: The page's files and their types; nothing else under ``/ui`` is served.
FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


def image_origin(settings: Settings) -> str:
    """Where the browser loads images from: the presigned URLs' scheme and host. Without
    an endpoint (AWS itself) the bucket's host depends on the region: any https host."""
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if not endpoint:
        return "https:"
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(settings: Settings) -> dict[str, str]:
    """No inline script or style, no plugins, no framing; fetch() to this origin only."""
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src 'self' {image_origin(settings)}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        # The page's address is harmless, but presigned links should not carry a referrer.
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        # The files change with the package: revalidate rather than serve a stale script.
        "Cache-Control": "no-cache",
    }


@router.get("/", response_class=RedirectResponse)
async def root() -> RedirectResponse:
    """The API's root: the playground."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def page(state: State) -> FileResponse:
    """The playground and gallery."""
    return FileResponse(
        UI_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers=security_headers(state.settings),
    )


@router.get("/ui/{name}")
async def asset(name: str, state: State) -> FileResponse:
    """One of the page's scripts or its stylesheet."""
    media_type = FILES.get(name)
    if media_type is None:
        raise NotFound(f"no such file: /ui/{name}")
    return FileResponse(
        UI_DIR / name, media_type=media_type, headers=security_headers(state.settings)
    )
