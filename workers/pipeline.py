"""The local runner: loads one model's diffusers pipeline once per process and generates.

Each model family has its pipeline (SDXL: ``StableDiffusionXLPipeline``; SD 1.5 and 2.1:
``StableDiffusionPipeline``) and its image-to-image twin, made from the loaded components.
torch and diffusers are imported inside methods so that importing this module (from the
Celery parent, say) initialises nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from common.errors import ModelLoadError, SdqError
from common.models import Family
from workers.compiled import CompiledUNet, CompilePlan, default_cache_dir, plan_for
from workers.precision import Dtype, Precision, resolve, seeded_latents, torch_dtype
from workers.progress import Canceled
from workers.runahead import RunAhead, event_factory

if TYPE_CHECKING:
    from common.models import Model
    from common.settings import Settings
    from common.tiers import Tier

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

#: Each family's (text-to-image, image-to-image) diffusers pipeline classes.
PIPELINES: dict[Family, tuple[str, str]] = {
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    "sd15": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "sd21": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
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


class BatchOutOfMemory(SdqError, MemoryError):
    """A call of several jobs ran out of GPU memory; each may still run alone."""

    message = "the GPU ran out of memory running several jobs in one call"


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One pipeline call: a prompt, its settings, one seed per image; with ``init_image``,
    image-to-image from it at ``strength`` (0 keeps it, 1 ignores it)."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    steps: int
    width: int | None
    height: int | None
    seeds: list[int]
    scheduler: str = "euler"
    init_image: Image.Image | None = None
    strength: float = 0.8

    @property
    def steps_run(self) -> int:
        """Denoising steps the pipeline runs: image-to-image skips the first
        ``1 - strength`` of the schedule, as diffusers counts them."""
        if self.init_image is None:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    @property
    def shape(self) -> tuple[object, ...] | None:
        """What generations must share to run in one pipeline call (several jobs', each
        its own prompts and seeds): ``None`` for image-to-image, which runs alone. Whether
        there is a negative prompt is part of it: SDXL's unconditional input for none is
        zeros, not the encoding of an empty one."""
        if self.init_image is not None:
            return None
        return (
            self.steps,
            self.width,
            self.height,
            self.guidance_scale,
            self.scheduler,
            self.negative_prompt is None,
        )

    @property
    def size(self) -> tuple[int, int] | None:
        """Image-to-image: the output's (width, height), the input's rounded down to
        multiples of 8 where the job names none."""
        if self.init_image is None:
            return None
        width, height = self.init_image.size
        return (self.width or max(8, width // 8 * 8), self.height or max(8, height // 8 * 8))


class DiffusersRunner:
    """Local generation with one model's diffusers pipeline, kept warm in the worker process.

    ``family`` picks the pipeline classes (``PIPELINES``). On CUDA: the tier's
    ``precision`` (bf16 from compute capability 8.0 on, with no VAE upcast; fp16 below, with
    the fp16-safe VAE ``vae`` where one is set; ``workers.precision``), the ``fp16``
    weights variant when the model has one, SDPA attention, channels_last, and with
    ``compile`` the UNet compiled for the shape buckets of ``compile_plan``, each warmed at
    load (``workers.compiled``). The CPU runs fp32, eager. Image-to-image runs on the same
    components (``from_pipe``): one copy of the weights in memory.
    """

    backend = "local"

    def __init__(
        self,
        model: str,
        *,
        family: Family = "sdxl",
        compile: bool = False,
        vae: str | None = None,
        variant: str | None = "fp16",
        threads: int | None = None,
        precision: Precision = "auto",
        dtype: Dtype | None = None,
        compile_plan: CompilePlan | None = None,
        compile_cache: Path | None = None,
    ) -> None:
        self.model = model
        self.family: Family = family
        self.threads = threads
        self.compile = compile
        self.compile_plan = compile_plan or CompilePlan()
        #: The persistent inductor and Triton cache (``SDQ_COMPILE_CACHE_DIR``).
        self.compile_cache = compile_cache
        self.vae = vae
        self.variant = variant
        self.precision: Precision = precision
        #: What the pipeline runs in: ``dtype`` where given (tests, the bench), else what
        #: ``precision`` resolves to on the device, at load.
        self.dtype: Dtype | None = dtype
        self.pipe: Any = None
        self.device = "cpu"
        #: The compiled UNet's dispatcher, when compiled.
        self.compiled: CompiledUNet | None = None
        #: Seconds the compile warm-up took at load (0 without compile).
        self.warmup_seconds = 0.0
        #: The most steps the device lagged behind the last call's progress reports.
        self.max_lag = 0
        #: Why the model could not be loaded, once a load has failed.
        self.load_error: str | None = None
        self._schedulers: dict[str, Any] = {}
        self._scheduler_config: Any = None
        self._img2img: Any = None

    @classmethod
    def for_worker(cls, settings: Settings, model: Model, tiers: Sequence[Tier]) -> DiffusersRunner:
        """The runner of a worker serving ``model`` on ``tiers`` (dearest first): the first
        tier's precision, and the compile buckets of them all."""
        precisions = {tier.precision for tier in tiers}
        if len(precisions) > 1:
            log.warning(
                "tiers %s ask for precisions %s; one pipeline serves them: %s (tier %s's)",
                ", ".join(tier.name for tier in tiers),
                ", ".join(sorted(precisions)),
                tiers[0].precision,
                tiers[0].name,
            )
        return cls(
            settings.model_source(model),
            family=model.family,
            compile=settings.torch_compile,
            # SDQ_VAE_MODEL is an SDXL VAE (the fp16-safe one): no other family takes it.
            vae=settings.vae_model if model.family == "sdxl" else None,
            variant=settings.model_variant,
            threads=settings.torch_threads,
            precision=tiers[0].precision if tiers else "auto",
            compile_plan=plan_for(tiers),
            compile_cache=default_cache_dir(settings) if settings.torch_compile else None,
        )

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
        import diffusers
        import torch
        from diffusers import AutoencoderKL

        started = time.monotonic()
        if self.threads:
            # torch starts one thread per core in every worker: two busy workers on one host
            # then thrash each other's caches, each image many times slower.
            torch.set_num_threads(self.threads)
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        capability = torch.cuda.get_device_capability() if cuda else None
        self.dtype = self.dtype or resolve(self.precision, capability)
        dtype = torch_dtype(self.dtype)
        options: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
        if self.family == "sdxl":
            # The invisible watermark costs a CPU pass per image and is on whenever its
            # package happens to be installed: off, explicitly.
            options["add_watermarker"] = False
        cls = getattr(diffusers, PIPELINES[self.family][0])
        try:
            if self.vae:
                options["vae"] = AutoencoderKL.from_pretrained(self.vae, torch_dtype=dtype)
            pipe = self._from_pretrained(cls, options, cuda)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {self.model!r}: {exc}") from exc
        self.adopt(pipe)
        log.info(
            "loaded %s (%s) on %s (%s) in %.1fs",
            self.model,
            self.family,
            self.device,
            dtype,
            time.monotonic() - started,
        )

    def adopt(self, pipe: Any) -> None:
        """Make ``pipe`` (the family's text-to-image pipeline, in the runner's dtype) the
        runner's: onto the device, SDPA attention, the VAE upcast only where needed,
        channels_last and compile (with its warm-up) on CUDA. ``load`` ends here; the GPU
        bench hands it a pipeline built from configs."""
        import torch
        from diffusers.models.attention_processor import AttnProcessor2_0

        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        if self.dtype is None:
            dtypes: dict[Any, Dtype] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
            self.dtype = dtypes.get(pipe.unet.dtype, "fp32")
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "watermark", None) is not None:
            pipe.watermark = None  # off, however the pipeline was made
        pipe.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA kernels
        self._set_vae_upcast(pipe)
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        # Inductor on the CPU needs a C++ toolchain at run time: the CPU compiles only with
        # another backend (the tests' "eager").
        self.compiled = None
        if self.compile and (cuda or self.compile_plan.backend != "inductor"):
            self.compiled = CompiledUNet(
                pipe.unet,
                backend=self.compile_plan.backend,
                cuda=cuda,
                buckets=len(self.compile_plan.buckets),
                cache=self.compile_cache,
            )
        self.pipe = pipe
        # The model's own scheduler config: every tier scheduler is made from it, so that
        # what the model was trained for (prediction_type: v-prediction for SD 2.1 at 768)
        # survives the swap, and no swap inherits another's options (Karras sigmas).
        self._scheduler_config = pipe.scheduler.config
        self._schedulers = {}
        self._img2img = None
        if self.compiled is not None:
            self._warm_up()

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

    def _set_vae_upcast(self, pipe: Any) -> None:
        """bf16 and the fp16-safe VAE decode in the model's dtype; only the stock VAE in
        fp16 (it overflows there) needs diffusers' upcast to fp32, on every decode."""
        upcast = self.dtype == "fp16" and not self.vae
        if upcast and pipe.vae.config.get("force_upcast", False):
            log.warning(
                "fp16 with the model's own VAE: every decode upcasts it to fp32; set "
                "SDQ_VAE_MODEL to an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix for SDXL)"
            )
            return
        pipe.vae.register_to_config(force_upcast=False)

    def _warm_up(self) -> None:
        """Compile and run each shape bucket now, in the pool child before it takes a job,
        so that no job compiles (``workers.compiled``)."""
        assert self.compiled is not None
        started = time.monotonic()
        with self.compiled.warming_up():
            for size, images in self.compile_plan.buckets:
                width, height = size if size is not None else (None, None)
                # Three steps: CUDA graph trees warm up, record, then replay a shape.
                self.generate(
                    Generation(
                        prompt="warm-up",
                        negative_prompt=None,
                        guidance_scale=5.0,
                        steps=3,
                        width=width,
                        height=height,
                        seeds=[0] * images,
                    )
                )
        self.warmup_seconds = time.monotonic() - started
        log.info(
            "torch.compile warm-up of %d shape buckets took %.1fs",
            len(self.compiled.warmed),
            self.warmup_seconds,
        )

    def scheduler(self, name: str) -> Any:
        """The tier's scheduler, made once per name from the model's scheduler config."""
        if name not in self._schedulers:
            import diffusers

            class_name, extra = SCHEDULERS[name]
            cls = getattr(diffusers, class_name)
            self._schedulers[name] = cls.from_config(self._scheduler_config, **extra)
        return self._schedulers[name]

    @property
    def img2img(self) -> Any:
        """The family's image-to-image pipeline over the loaded components, made once."""
        if self._img2img is None:
            import diffusers

            if self.pipe is None:
                self.load()
            cls = getattr(diffusers, PIPELINES[self.family][1])
            self._img2img = cls.from_pipe(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

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
        if generation.init_image is not None and generation.steps_run == 0:
            # diffusers cannot run no step at all; a strength this low asks for the input.
            log.info(
                "strength %s of %d steps runs no step: the output is the input",
                generation.strength,
                generation.steps,
            )
            assert generation.size is not None
            image = _resized(generation.init_image, generation.size)
            return [image.copy() for _ in generation.seeds]
        pipe = self.pipe if generation.init_image is None else self.img2img
        pipe.scheduler = self.scheduler(generation.scheduler)
        try:
            return self._call(pipe, generation, generation.seeds, on_step)
        except torch.cuda.OutOfMemoryError:
            log.warning("CUDA out of memory; retrying one image a call with VAE tiling")
        torch.cuda.empty_cache()
        # diffusers 0.42 dropped the pipelines' enable_vae_tiling(); the VAE has its own,
        # and the image-to-image pipeline shares it.
        pipe.vae.enable_tiling()
        count = len(generation.seeds)
        try:
            return [
                image
                for index, seed in enumerate(generation.seeds)
                for image in self._call(pipe, generation, [seed], _one_of(on_step, index, count))
            ]
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise CudaOutOfMemory() from exc
        finally:
            pipe.vae.disable_tiling()

    def generate_many(
        self, generations: Sequence[Generation], on_steps: Sequence[StepCallback | None]
    ) -> list[list[Image.Image] | None]:
        """Several jobs' generations of one ``shape`` in one pipeline call: each its own
        prompts and seeds, and the images it gets alone (its noise is its seeds', drawn on
        the CPU). ``on_steps[i]`` gets generation ``i``'s steps; one that raises
        ``Canceled`` is dropped (its slot of the result is ``None``) while the rest run on,
        and the call stops once every one is dropped (``Canceled``). CUDA out of memory
        raises ``BatchOutOfMemory``: each can then run alone, with ``generate``'s retry."""
        import torch

        if self.pipe is None:
            self.load()
        first = generations[0]
        if any(generation.shape != first.shape for generation in generations):
            raise ValueError("generations of different shapes cannot share a call")
        if first.shape is None:
            raise ValueError("image-to-image runs alone")
        owners = [index for index, generation in enumerate(generations) for _ in generation.seeds]
        live = set(range(len(generations)))

        def report(step: int, total: int) -> None:
            for index in sorted(live):
                callback = on_steps[index]
                if callback is None:
                    continue
                try:
                    callback(step, total)
                except Canceled:
                    live.discard(index)
            if not live:
                raise Canceled()

        self.pipe.scheduler = self.scheduler(first.scheduler)
        try:
            images = self._call(
                self.pipe,
                first,
                [seed for generation in generations for seed in generation.seeds],
                report,
                prompts=[generations[owner].prompt for owner in owners],
                negative_prompts=None
                if first.negative_prompt is None
                else [generations[owner].negative_prompt or "" for owner in owners],
            )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise BatchOutOfMemory() from exc
        each: list[list[Image.Image]] = [[] for _ in generations]
        for owner, image in zip(owners, images, strict=True):
            each[owner].append(image)
        return [images if index in live else None for index, images in enumerate(each)]

    def _call(
        self,
        pipe: Any,
        generation: Generation,
        seeds: list[int],
        on_step: StepCallback | None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
    ) -> list[Image.Image]:
        """One pipeline call of ``seeds``: all of ``generation``'s prompts, or with
        ``prompts`` (and ``negative_prompts``) one of them per seed."""
        import torch

        # CPU generators give the same noise for a seed on any device (the schedulers that
        # add noise at each step draw it from them too).
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        # Report only the steps the device has finished, at most two behind Python.
        run_ahead = RunAhead(on_step, event_factory(self.device))

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # The steps this call runs: image-to-image runs steps x strength of them.
            run_ahead.step(step + 1, pipe.num_timesteps)
            return kwargs

        options: dict[str, Any] = {
            "prompt": generation.prompt if prompts is None else prompts,
            "negative_prompt": generation.negative_prompt if prompts is None else negative_prompts,
            "guidance_scale": generation.guidance_scale,
            "num_inference_steps": generation.steps,
            "num_images_per_prompt": len(seeds) if prompts is None else 1,
            "generator": generators,
            "callback_on_step_end": step_end,
        }
        if generation.init_image is None:
            options.update(
                width=generation.width,
                height=generation.height,
                latents=self._latents(pipe, generation, seeds),
            )
        else:
            assert generation.size is not None
            options.update(
                image=_resized(generation.init_image, generation.size),
                strength=generation.strength,
            )
        with torch.inference_mode():
            result = pipe(**options)
        run_ahead.finish()
        self.max_lag = run_ahead.max_lag
        return list(result.images)

    def _latents(self, pipe: Any, generation: Generation, seeds: list[int]) -> Any:
        """The initial noise of ``seeds`` at the generation's size, drawn in fp32 on the
        CPU: the same image for a seed in bf16, fp16 or fp32 (``workers.precision``)."""
        scale = pipe.vae_scale_factor
        native = pipe.unet.config.sample_size * scale
        width, height = generation.width or native, generation.height or native
        shape = (pipe.unet.config.in_channels, height // scale, width // scale)
        return seeded_latents(seeds, shape, pipe.unet.dtype, self.device)


def _one_of(on_step: StepCallback | None, index: int, count: int) -> StepCallback | None:
    """Image ``index`` of ``count``, run alone (the out-of-memory retry): its steps as steps
    of the whole job, so that progress never goes back and each step's id stays unique."""
    if on_step is None:
        return None
    callback = on_step

    def report(step: int, total: int) -> None:
        callback(index * total + step, count * total)

    return report


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` in RGB at ``size``: the output of image-to-image has its input's size."""
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


#: Its name before it ran more than SDXL (bench/bench.py and tests/e2e/test_poison.py).
SdxlRunner = DiffusersRunner
