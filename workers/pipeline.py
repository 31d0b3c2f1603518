"""The SDXL runner: loads ``StableDiffusionXLPipeline`` once per process and generates.

torch and diffusers are imported inside methods so that importing this module (from the
Celery parent, say) initialises nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.errors import ModelLoadError

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Generation:
    """One pipeline call: a prompt, its settings, one seed per image."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    steps: int
    width: int | None
    height: int | None
    seeds: list[int]


class SdxlRunner:
    """Local generation with diffusers' SDXL pipeline, kept warm in the worker process."""

    backend = "local"

    def __init__(self, model: str, *, compile: bool = False) -> None:
        self.model = model
        self.compile = compile
        self.pipe: Any = None
        self.device = "cpu"

    @property
    def model_name(self) -> str:
        path = Path(self.model)
        return path.name if path.exists() else self.model

    def load(self) -> None:
        """``from_pretrained`` the model (a hub id or a local directory) onto the device."""
        import torch
        from diffusers import StableDiffusionXLPipeline

        started = time.monotonic()
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        dtype = torch.float16 if cuda else torch.float32
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                self.model, torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {self.model!r}: {exc}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
            if self.compile:
                pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        self.pipe = pipe
        log.info(
            "loaded %s on %s (%s) in %.1fs",
            self.model,
            self.device,
            dtype,
            time.monotonic() - started,
        )

    def generate(
        self, generation: Generation, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """Run the pipeline; one ``torch.Generator`` per image makes each seed reproducible."""
        import torch

        if self.pipe is None:
            self.load()
        # CPU generators give the same noise for a seed on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in generation.seeds]

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, generation.steps)
            return kwargs

        with torch.inference_mode():
            result = self.pipe(
                prompt=generation.prompt,
                negative_prompt=generation.negative_prompt,
                guidance_scale=generation.guidance_scale,
                num_inference_steps=generation.steps,
                width=generation.width,
                height=generation.height,
                num_images_per_prompt=len(generation.seeds),
                generator=generators,
                callback_on_step_end=step_end,
            )
        return list(result.images)
