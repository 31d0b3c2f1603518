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

from common.errors import ModelLoadError, SdqError

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]

# Tier scheduler names -> (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def quiet_libraries() -> None:
    """transformers and diffusers write progress bars and advisories (such as torchvision
    being absent) straight to stderr on import and load; a worker's log keeps its own lines.
    Call before importing diffusers."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


class CudaOutOfMemory(SdqError, MemoryError):
    message = "the GPU ran out of memory, even one image at a time with VAE tiling"


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
    scheduler: str = "euler"


class SdxlRunner:
    """Local generation with diffusers' SDXL pipeline, kept warm in the worker process.

    On CUDA: fp16 weights (the ``fp16`` variant when the model has one), an optional
    fp16-safe VAE, SDPA attention, channels_last, optional ``torch.compile`` with a warm-up
    at load so the first job is not the slow one.
    """

    backend = "local"

    def __init__(
        self,
        model: str,
        *,
        compile: bool = False,
        vae: str | None = None,
        variant: str | None = "fp16",
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.threads = threads
        self.compile = compile
        self.vae = vae
        self.variant = variant
        self.pipe: Any = None
        self.device = "cpu"
        #: Why the model could not be loaded, once a load has failed.
        self.load_error: str | None = None
        self._schedulers: dict[str, Any] = {}

    @property
    def model_name(self) -> str:
        path = Path(self.model)
        return path.name if path.exists() else self.model

    def load(self) -> None:
        """``from_pretrained`` the model (a hub id or a local directory) onto the device."""
        try:
            self._load()
        except ModelLoadError as exc:
            self.load_error = exc.message
            raise

    def _load(self) -> None:
        quiet_libraries()
        import torch
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0

        started = time.monotonic()
        if self.threads:
            # torch starts one thread per core in every worker: two busy workers on one host
            # then thrash each other's caches, each image many times slower (issue 15).
            torch.set_num_threads(self.threads)
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        dtype = torch.float16 if cuda else torch.float32
        options: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
        try:
            if self.vae:
                options["vae"] = AutoencoderKL.from_pretrained(self.vae, torch_dtype=dtype)
            pipe = self._from_pretrained(StableDiffusionXLPipeline, options, cuda)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {self.model!r}: {exc}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA kernels
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            if self.compile:
                pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        self.pipe = pipe
        self._schedulers = {}
        if cuda and self.compile:
            self._warm_up()
        log.info(
            "loaded %s on %s (%s) in %.1fs",
            self.model,
            self.device,
            dtype,
            time.monotonic() - started,
        )

    def _from_pretrained(self, cls: Any, options: dict[str, Any], cuda: bool) -> Any:
        if cuda and self.variant:
            try:
                return cls.from_pretrained(self.model, variant=self.variant, **options)
            except (OSError, ValueError):
                log.info(
                    "model %s has no %s variant; loading its default weights",
                    self.model,
                    self.variant,
                )
        return cls.from_pretrained(self.model, **options)

    def _warm_up(self) -> None:
        """Compile now, at the native size, so the first job does not pay for it."""
        started = time.monotonic()
        self.generate(Generation("warm-up", None, 5.0, 2, None, None, [0]))
        log.info("torch.compile warm-up took %.1fs", time.monotonic() - started)

    def scheduler(self, name: str) -> Any:
        """The pipeline's scheduler swapped for the tier's, made once per name."""
        if name not in self._schedulers:
            import diffusers

            class_name, extra = SCHEDULERS[name]
            cls = getattr(diffusers, class_name)
            self._schedulers[name] = cls.from_config(self.pipe.scheduler.config, **extra)
        return self._schedulers[name]

    def generate(
        self, generation: Generation, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """Run the pipeline; one ``torch.Generator`` per image makes each seed reproducible.

        CUDA out of memory: free the cache, then retry one image per call with VAE tiling;
        if that fails too, raise ``CudaOutOfMemory`` for the fallback policy to handle.
        """
        import torch

        if self.pipe is None:
            self.load()
        self.pipe.scheduler = self.scheduler(generation.scheduler)
        try:
            return self._call(generation, generation.seeds, on_step)
        except torch.cuda.OutOfMemoryError:
            log.warning("CUDA out of memory; retrying one image a call with VAE tiling")
        torch.cuda.empty_cache()
        self.pipe.enable_vae_tiling()
        try:
            return [
                image
                for seed in generation.seeds
                for image in self._call(generation, [seed], on_step)
            ]
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise CudaOutOfMemory() from exc
        finally:
            self.pipe.disable_vae_tiling()

    def _call(
        self, generation: Generation, seeds: list[int], on_step: StepCallback | None
    ) -> list[Image.Image]:
        import torch

        # CPU generators give the same noise for a seed on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

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
                num_images_per_prompt=len(seeds),
                generator=generators,
                callback_on_step_end=step_end,
            )
        return list(result.images)
