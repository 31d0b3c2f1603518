"""Styles: a prompt template and a negative prompt, with optional defaults, by id or slug."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from common import toml_files
from common.errors import InvalidRequest, SdqError
from common.tiers import Scheduler

#: Where the error for an unknown style sends the client.
HOW_TO_LIST = "GET /v1/styles lists them"


class Style(BaseModel):
    """One style, as the styles file declares it."""

    id: int = Field(ge=1, description="Hotpot's numeric styleId.")
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,47}$")
    name: str
    prompt: str = Field(description="The job's prompt goes where `{prompt}` is.")
    negative_prompt: str = ""
    guidance_scale: float | None = Field(None, ge=0, le=30)
    steps: int | None = Field(None, ge=1)
    scheduler: Scheduler | None = None
    model: str | None = None

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("a style's prompt must contain {prompt}")
        return value

    def apply(self, prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
        """The prompt and negative prompt this style makes of a job's."""
        styled = self.prompt.replace("{prompt}", prompt)
        negatives = [part for part in (negative_prompt, self.negative_prompt) if part]
        return styled, ", ".join(negatives) or None


class StyleConfigError(SdqError):
    message = "the styles file is invalid"


class Styles:
    """The styles of one deployment, by id and by slug, in file order."""

    def __init__(self, styles: list[Style]) -> None:
        self._by_slug = {style.slug: style for style in styles}
        self._by_id = {style.id: style for style in styles}
        if len(self._by_id) != len(styles) or len(self._by_slug) != len(styles):
            raise StyleConfigError("two styles share an id or a slug")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_slug.values())

    def __len__(self) -> int:
        return len(self._by_slug)

    def get(self, ref: int | str) -> Style:
        """A style by its id (a number, or digits as Hotpot's forms send them) or slug."""
        text = str(ref).strip()
        style = self._by_id.get(int(text)) if text.isdigit() else self._by_slug.get(text.lower())
        if style is None:
            raise InvalidRequest(f"unknown style {ref!r}; {HOW_TO_LIST}")
        return style

    @classmethod
    def from_toml(cls, text: str, source: str = "styles file") -> Styles:
        return cls(toml_files.entries(text, source, "styles", "slug", Style, StyleConfigError))


@lru_cache
def load_styles(path: Path | None = None) -> Styles:
    """Read the styles file at ``path``, or the one sdq ships."""
    return Styles.from_toml(*toml_files.read(path, "styles.toml"))
