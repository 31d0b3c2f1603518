"""Tiers: queue, hardware classes, generation defaults and limits, price. Loaded from TOML."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from common import toml_files
from common.errors import InvalidRequest, SdqError
from common.models import Models

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
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on compute capability 8.0 and up, else fp16; cpu fp32."
    )
    compile_sizes: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(width, height) pairs torch.compile warms (SDQ_TORCH_COMPILE), each with "
        "1..max(max_images, batch_images) images; the model's native size when empty. Others "
        "run eager.",
    )
    scheduler: Scheduler = "euler"
    batch_images: int = Field(
        1,
        ge=1,
        le=16,
        description="The most images one pipeline call runs for several waiting jobs of the "
        "same model, size, steps, guidance and scheduler; 1 runs each job alone.",
    )
    remote_url: str | None = Field(None, description="A Hotpot-compatible endpoint.")
    remote_fallback: list[FallbackPolicy] = Field(default_factory=list)
    remote_only: bool = False
    spillover_after_seconds: float | None = Field(
        None, gt=0, description="Send a job to the remote API once it waited this long."
    )
    default_model: str = Field("sdxl", description="The model a job gets when it names none.")
    models: list[str] = Field(
        default_factory=list, description="Every model it serves; its default when empty."
    )
    min_workers: int = Field(
        1,
        ge=0,
        description="Workers KEDA keeps per (tier, model) when its queue is empty; 0 scales "
        "the pair to zero, and its first waiting job starts a worker (and waits for it).",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Tier:
        if self.default_steps > self.max_steps:
            raise ValueError(f"tier {self.name}: default_steps exceeds max_steps")
        if (self.remote_only or self.remote_fallback) and not self.remote_url:
            raise ValueError(f"tier {self.name}: remote_only and remote_fallback need remote_url")
        for width, height in self.compile_sizes:
            if width % 8 or height % 8 or max(width, height) > self.max_side:
                raise ValueError(
                    f"tier {self.name}: compile size {width}x{height} must be multiples of 8 "
                    f"within max_side {self.max_side}"
                )
        if self.default_model not in self.models:
            self.models.insert(0, self.default_model)
        return self

    def serves(self, model: str) -> None:
        """Raise InvalidRequest unless this tier serves ``model``."""
        if model not in self.models:
            raise InvalidRequest(
                f"tier {self.name} does not serve model {model!r}; "
                f"it serves: {', '.join(self.models)}"
            )

    def lane(self, model: str) -> str:
        """Where a job of ``model`` waits: the tier's own name for its default model, and
        ``tier.model`` for another, so that a worker of one model never takes another's."""
        return self.name if model == self.default_model else f"{self.name}.{model}"

    def queue_for(self, model: str) -> str:
        """The broker queue of (this tier, ``model``): the tier's queue for its default."""
        return self.queue if model == self.default_model else f"{self.queue}.{model}"

    @property
    def lanes(self) -> list[tuple[str, str, str]]:
        """(model, lane, queue) for every model it serves, its default first."""
        return [(model, self.lane(model), self.queue_for(model)) for model in self.models]

    def falls_back(self, policy: FallbackPolicy) -> bool:
        return self.remote_url is not None and policy in self.remote_fallback

    @property
    def images_per_call(self) -> int:
        """The most images one pipeline call runs: a job's, or a batch of jobs'."""
        return max(self.max_images, self.batch_images)

    def time_limit(self, base: float, per_step: float) -> float:
        """Seconds its largest call (most steps, biggest size, most images, a job's or a
        batch's) may take: ``base`` plus ``per_step`` for each step of each image, scaled by
        megapixels."""
        megapixels = self.max_side * self.max_side / (1024 * 1024)
        return base + per_step * self.max_steps * max(1.0, megapixels) * self.images_per_call

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
        queues = [queue for tier in tiers for _, _, queue in tier.lanes]
        if len(set(queues)) != len(queues):
            raise TierConfigError("two tiers share a queue")

    def check_models(self, models: Models) -> None:
        """Raise TierConfigError when a tier names a model the models file lacks."""
        for tier in self:
            unknown = [model for model in tier.models if model not in models]
            if unknown:
                raise TierConfigError(
                    f"tier {tier.name} names models the models file lacks: {', '.join(unknown)}"
                )

    def lanes(self) -> list[tuple[Tier, str, str, str]]:
        """(tier, model, lane, queue) of every pair a worker may serve."""
        return [(tier, *lane) for tier in self for lane in tier.lanes]

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
        return cls(toml_files.entries(text, source, "tiers", "name", Tier, TierConfigError))


@lru_cache
def load_tiers(path: Path | None = None) -> Tiers:
    """Read the tiers file at ``path``, or the one sdq ships."""
    return Tiers.from_toml(*toml_files.read(path, "tiers.toml"))
