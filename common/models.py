"""Models: which diffusers pipeline runs each, where it loads from, its native size."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from common import toml_files
from common.errors import InvalidRequest, SdqError

Family = Literal["sdxl", "sd15", "sd21"]


class Model(BaseModel):
    """One model, as the models file declares it."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    name: str = ""
    family: Family
    source: str = Field(description="A hub id or a local directory, for from_pretrained.")
    native_side: int = Field(ge=64, description="Default width and height.")


class ModelConfigError(SdqError):
    message = "the models file is invalid"


class Models:
    """The models of one deployment, by id, in file order."""

    def __init__(self, models: list[Model]) -> None:
        if not models:
            raise ModelConfigError("the models file declares no model")
        self._by_id = {model.id: model for model in models}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._by_id

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def get(self, model_id: str) -> Model:
        try:
            return self._by_id[model_id]
        except KeyError:
            raise InvalidRequest(
                f"unknown model {model_id!r}; choose one of: {', '.join(self._by_id)}"
            ) from None

    @classmethod
    def from_toml(cls, text: str, source: str = "models file") -> Models:
        return cls(toml_files.entries(text, source, "models", "id", Model, ModelConfigError))


@lru_cache
def load_models(path: Path | None = None) -> Models:
    """Read the models file at ``path``, or the one sdq ships."""
    return Models.from_toml(*toml_files.read(path, "models.toml"))
