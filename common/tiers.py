"""Tiers: queue, hardware classes, generation defaults and limits, price. Loaded from TOML."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from common.errors import InvalidRequest, SdqError

HardwareClass = Literal["cpu", "t4", "l4", "a10g", "l40s", "a100", "h100", "h200"]
Scheduler = Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"]
#: When a worker hands a job to the tier's remote API instead of running it itself.
FallbackPolicy = Literal["no_device", "load_failed", "oom", "spillover"]


class Tier(BaseModel):
    """One service tier, as the tiers file declares it."""

    name: str
    description: str = ""
    queue: str
    hardware: list[HardwareClass] = Field(min_length=1)
    default_steps: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    max_side: int = Field(ge=64)
    max_images: int = Field(1, ge=1)
    price: int = Field(ge=0, description="Credits per image.")
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    scheduler: Scheduler = "euler"
    remote_url: str | None = Field(None, description="A Hotpot-compatible endpoint.")
    remote_fallback: list[FallbackPolicy] = Field(default_factory=list)
    remote_only: bool = False
    spillover_after_seconds: float | None = Field(
        None, gt=0, description="Send a job to the remote API once it waited this long."
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Tier:
        if self.default_steps > self.max_steps:
            raise ValueError(f"tier {self.name}: default_steps exceeds max_steps")
        if (self.remote_only or self.remote_fallback) and not self.remote_url:
            raise ValueError(f"tier {self.name}: remote_only and remote_fallback need remote_url")
        return self

    def falls_back(self, policy: FallbackPolicy) -> bool:
        return self.remote_url is not None and policy in self.remote_fallback

    def time_limit(self, base: float, per_step: float) -> float:
        """Seconds its largest job (most steps, biggest size, most images) may take:
        ``base`` plus ``per_step`` for each step of each image, scaled by megapixels."""
        megapixels = self.max_side * self.max_side / (1024 * 1024)
        return base + per_step * self.max_steps * max(1.0, megapixels) * self.max_images

    def cost(self, num_images: int) -> int:
        return self.price * num_images

    def check_limits(
        self, *, steps: int, width: int | None, height: int | None, images: int
    ) -> None:
        """Raise InvalidRequest when a request exceeds what this tier allows."""
        if steps > self.max_steps:
            raise InvalidRequest(f"steps must be at most {self.max_steps} on tier {self.name}")
        for label, side in (("width", width), ("height", height)):
            if side is not None and side > self.max_side:
                raise InvalidRequest(f"{label} must be at most {self.max_side} on tier {self.name}")
        if images > self.max_images:
            raise InvalidRequest(
                f"num_images must be at most {self.max_images} on tier {self.name}"
            )

    def accepts(self, hardware_class: str, *, development: bool) -> bool:
        """Whether a device of ``hardware_class`` may serve this tier."""
        return hardware_class in self.hardware or (development and hardware_class == "cpu")


class TierConfigError(SdqError):
    message = "the tiers file is invalid"


class Tiers:
    """The tiers of one deployment, by name, in file order."""

    def __init__(self, tiers: list[Tier]) -> None:
        if not tiers:
            raise TierConfigError("the tiers file declares no tier")
        self._by_name = {tier.name: tier for tier in tiers}
        queues = [tier.queue for tier in tiers]
        if len(set(queues)) != len(queues):
            raise TierConfigError("two tiers share a queue")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> Tier:
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidRequest(
                f"unknown tier {name!r}; choose one of: {', '.join(self._by_name)}"
            ) from None

    @classmethod
    def from_toml(cls, text: str, source: str = "tiers file") -> Tiers:
        try:
            data = tomllib.loads(text)
            tiers = [
                Tier.model_validate({"name": name, **spec})
                for name, spec in data.get("tiers", {}).items()
            ]
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise TierConfigError(f"{source}: {exc}") from exc
        return cls(tiers)


@lru_cache
def load_tiers(path: Path | None = None) -> Tiers:
    """Read the tiers file at ``path``, or the one sdq ships."""
    if path is None:
        text = resources.files("common").joinpath("tiers.toml").read_text(encoding="utf-8")
        return Tiers.from_toml(text, "built-in tiers.toml")
    return Tiers.from_toml(path.read_text(encoding="utf-8"), str(path))
