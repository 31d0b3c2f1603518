"""The operator-replaceable TOML files (tiers, models, styles): read one, or the one sdq ships,
and validate each entry of its table."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.errors import SdqError

M = TypeVar("M", bound=BaseModel)


def read(path: Path | None, shipped: str) -> tuple[str, str]:
    """The text of ``path``, or of the file sdq ships as ``shipped``, and a name for errors."""
    if path is None:
        text = resources.files("common").joinpath(shipped).read_text(encoding="utf-8")
        return text, f"built-in {shipped}"
    return path.read_text(encoding="utf-8"), str(path)


def entries(
    text: str, source: str, table: str, key: str, model: type[M], error: type[SdqError]
) -> list[M]:
    """Each entry of ``[table.<name>]`` as ``model``, its name as the field ``key``."""
    try:
        data = tomllib.loads(text)
        return [
            model.model_validate({key: name, **spec}) for name, spec in data.get(table, {}).items()
        ]
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise error(f"{source}: {exc}") from exc
