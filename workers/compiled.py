"""``torch.compile`` of the UNet that is safe in a worker.

A compiled graph is specialised to its input shapes and dtypes: a job at a size, an image
count or a scheduler the warm-up did not cover used to recompile inside the job, for
minutes under max-autotune. Here the UNet's ``forward`` becomes a ``CompiledUNet``:

* a fixed set of shape buckets (the tiers' ``compile_sizes`` times 1..``max_images``
  images, with classifier-free guidance) is compiled and warmed in the pool child before
  it takes a job; each later call of a warmed shape runs the compiled graph under
  ``fail_on_recompile``, and anything else runs the eager module: never a compile in a job;
* every timestep reaches the UNet as float32 (DPM++ and UniPC hand out int64 ones, Euler
  float32): one graph serves every scheduler, and the values are the same (the UNet's
  time projection casts them to float anyway);
* the default inductor mode, with CUDA graphs ("reduce-overhead") on CUDA: no
  max-autotune in a worker;
* a persistent cache directory (``SDQ_COMPILE_CACHE_DIR``, default under the sdq home)
  keeps inductor's and Triton's artefacts across restarts, so that a warm-up after the
  first one mostly loads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.settings import Settings
    from common.tiers import Tier

log = logging.getLogger(__name__)

#: (width, height) of a compiled size; ``None`` is the model's native size.
Size = tuple[int, int] | None

#: A worker's load before its warm-up: reading the weights and moving them to the GPU.
LOAD_SECONDS = 180.0
#: One shape bucket's first compile with the default inductor mode and CUDA graphs, with
#: a cold cache: a minute or two for SDXL's UNet (an estimate until the GPU bench measures
#: it; a warm cache needs far less).
COMPILE_SECONDS_PER_BUCKET = 150.0


@dataclass(frozen=True)
class CompilePlan:
    """The shapes to compile: each of ``sizes`` with 1 to ``max_images`` images, with
    guidance (a job with ``guidance_scale <= 1`` runs eager); ``backend`` is inductor
    in workers, ``eager`` in tests (dynamo's tracing and guards without code generation)."""

    sizes: tuple[Size, ...] = (None,)
    max_images: int = 1
    backend: str = "inductor"

    @property
    def buckets(self) -> list[tuple[Size, int]]:
        """(size, images) of every shape the warm-up compiles."""
        return [(size, n) for size in self.sizes for n in range(1, self.max_images + 1)]


def plan_for(tiers: Sequence[Tier], backend: str = "inductor") -> CompilePlan:
    """The shapes of the tiers a worker serves: their sizes (the native one where a tier
    lists none), up to their largest image count (a job's, or a batch of jobs')."""
    sizes: list[Size] = []
    for tier in tiers:
        tier_sizes: list[Size] = list(tier.compile_sizes) or [None]
        for size in tier_sizes:
            if size not in sizes:
                sizes.append(size)
    max_images = max((tier.images_per_call for tier in tiers), default=1)
    return CompilePlan(tuple(sizes) or (None,), max_images, backend)


def alive_timeout(plan: CompilePlan, floor: float) -> float:
    """Seconds the Celery parent waits for a pool child's start (load and warm-up): at
    least ``floor`` (``SDQ_WORKER_PROC_ALIVE_TIMEOUT``), more for many buckets."""
    return max(floor, LOAD_SECONDS + COMPILE_SECONDS_PER_BUCKET * len(plan.buckets))


def cache_dir(root: Path | None) -> Path | None:
    """Points inductor's and Triton's caches under ``root`` (``SDQ_COMPILE_CACHE_DIR``, by
    default ``<home>/compile-cache``), unless the operator set them; ``None``: torch's own
    temporary ones. A restarted worker then loads its graphs' kernels instead of making
    them again."""
    if root is None:
        return None
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    return root


def default_cache_dir(settings: Settings) -> Path:
    """The worker's compile cache: ``SDQ_COMPILE_CACHE_DIR``, else under the sdq home."""
    return settings.compile_cache_dir or settings.home / "compile-cache"


def _configure(buckets: int) -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # One graph per bucket: dynamo's default limit (8) would fall back to eager silently.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, buckets + 8)
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, buckets + 8)
    inductor_config.fx_graph_cache = True
    # 1x1 convolutions as matmuls: what diffusers' own recipe sets, at no compile cost.
    inductor_config.conv_1x1_as_mm = True


Key = tuple[Any, ...]


class CompiledUNet:
    """Stands in for ``unet.forward``: the compiled graph for warmed shapes, the eager
    module for the rest, timesteps as float32 for both."""

    def __init__(
        self,
        unet: Any,
        *,
        backend: str,
        cuda: bool,
        buckets: int = 1,
        cache: Path | None = None,
    ) -> None:
        import torch

        cache_dir(cache)
        _configure(buckets)
        self.cuda = cuda
        self.eager: Callable[..., Any] = unet.forward
        # CUDA graphs replay a step's kernels in one launch; the default inductor mode
        # compiles in seconds to minutes where max-autotune takes many.
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self.compiled = torch.compile(
            self.eager, backend=backend, mode=mode, fullgraph=True, dynamic=False
        )
        self.warmed: set[Key] = set()
        self._warming = False
        #: Calls of warmed shapes after the warm-up (the compiled graph), and of the others
        #: (the eager module).
        self.compiled_calls = 0
        self.eager_calls = 0
        #: Warmed shapes whose guards failed all the same (run eager since).
        self.refused: list[Key] = []
        unet.forward = self

    @contextmanager
    def warming_up(self) -> Iterator[None]:
        """Within: every shape called is compiled and becomes a warmed one."""
        self._warming = True
        try:
            yield
        finally:
            self._warming = False

    def __call__(
        self, sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any
    ) -> Any:
        import torch

        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        key = (tuple(sample.shape), sample.dtype, tuple(encoder_hidden_states.shape))
        if self._warming:
            self.warmed.add(key)
            return self._run_compiled(sample, timestep, encoder_hidden_states, *args, **kwargs)
        if key in self.warmed:
            from torch._dynamo.exc import RecompileError

            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    output = self._run_compiled(
                        sample, timestep, encoder_hidden_states, *args, **kwargs
                    )
                self.compiled_calls += 1
                return output
            except RecompileError:
                # A guard the warm-up did not pin (an option of a new diffusers): eager from
                # now on, never minutes of compiling inside a job.
                log.warning("the compiled UNet would recompile for %s; running it eager", key)
                self.warmed.discard(key)
                self.refused.append(key)
        self.eager_calls += 1
        return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def _run_compiled(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.cuda:
            # A new iteration of the CUDA graph tree: the last step's outputs are consumed.
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)
