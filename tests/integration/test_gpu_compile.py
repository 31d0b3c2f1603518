"""torch.compile that is safe in a worker (issue 18): each shape bucket of the tiers is
compiled and warmed at load, and no job compiles afterwards, whatever its scheduler (DPM++
and UniPC hand the UNet int64 timesteps, Euler float32), image count or warmed size; any
other shape runs the eager UNet. The tiny UNet, compiled with dynamo's ``eager`` backend
(its tracing and guards, without code generation), on the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from common.models import load_models
from common.settings import Settings
from common.tiers import TierConfigError, Tiers
from workers import compiled
from workers.compiled import CompiledUNet, CompilePlan, alive_timeout, plan_for
from workers.pipeline import SCHEDULERS, DiffusersRunner, Generation

SIZES = ((64, 64), (96, 64))


def graphs() -> int:
    """Graphs dynamo has compiled in this process: one per bucket, and one per recompile."""
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def warmed(tiny_model: Path) -> tuple[DiffusersRunner, int]:
    """The runner, compiled and warmed for SIZES with 1 and 2 images; the graphs before."""
    torch._dynamo.reset()
    before = graphs()
    runner = DiffusersRunner(
        str(tiny_model),
        compile=True,
        compile_plan=CompilePlan(SIZES, max_images=2, backend="eager"),
    )
    runner.load()
    return runner, before


@pytest.fixture(scope="module")
def eager(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


def pixels(runner: DiffusersRunner, generation: Generation) -> list[np.ndarray]:
    return [np.asarray(image).astype(int) for image in runner.generate(generation)]


def test_the_warm_up_compiles_each_bucket_once(warmed: tuple[DiffusersRunner, int]) -> None:
    runner, before = warmed
    assert runner.compiled is not None and runner.warmup_seconds > 0
    # Two sizes, one and two images, with guidance: four shapes, four graphs.
    assert len(runner.compiled.warmed) == 4
    assert graphs() - before == 4


def test_no_recompile_across_schedulers_image_counts_and_sizes(
    warmed: tuple[DiffusersRunner, int],
) -> None:
    runner, _ = warmed
    assert runner.compiled is not None
    start, calls = graphs(), runner.compiled.compiled_calls
    for name in SCHEDULERS:
        for width, height in SIZES:
            for images in (1, 2):
                seeds = list(range(images))
                runner.generate(
                    Generation(
                        prompt="a kite",
                        negative_prompt=None,
                        guidance_scale=6.0,
                        steps=2,
                        width=width,
                        height=height,
                        seeds=seeds,
                        scheduler=name,
                    )
                )
        if name in ("dpmpp_2m", "unipc"):
            # Not a vacuous pass: these do hand out int64 timesteps, cast before the UNet.
            assert runner.pipe.scheduler.timesteps.dtype == torch.int64
    assert graphs() == start  # zero recompiles after the warm-up
    assert runner.compiled.refused == [] and runner.compiled.eager_calls == 0
    # Each call ran the compiled graph: 6 schedulers x 2 sizes x 2 counts x 2 steps
    # (DPM++ and UniPC run 2 steps too; none of these is second-order).
    assert runner.compiled.compiled_calls - calls == 6 * 2 * 2 * 2


def test_other_shapes_run_eager_without_compiling(
    warmed: tuple[DiffusersRunner, int], eager: DiffusersRunner
) -> None:
    """A size or image count not warmed, or no guidance (half the batch), runs the eager
    UNet: the same images, and not one compile inside the job."""
    runner, _ = warmed
    assert runner.compiled is not None
    start, eager_calls = graphs(), runner.compiled.eager_calls
    for generation in (
        Generation(
            prompt="a kite",
            negative_prompt=None,
            guidance_scale=6.0,
            steps=2,
            width=64,
            height=96,
            seeds=[5],
        ),  # a size not warmed
        Generation(
            prompt="a kite",
            negative_prompt=None,
            guidance_scale=6.0,
            steps=2,
            width=64,
            height=64,
            seeds=[5, 6, 7],
        ),  # three images
        Generation(
            prompt="a kite",
            negative_prompt=None,
            guidance_scale=1.0,
            steps=2,
            width=64,
            height=64,
            seeds=[5],
        ),  # no classifier-free guidance
    ):
        got, want = pixels(runner, generation), pixels(eager, generation)
        for a, b in zip(got, want, strict=True):
            assert np.abs(a - b).max() <= 1
    assert graphs() == start
    assert runner.compiled.eager_calls - eager_calls == 3 * 2


def test_compiled_and_eager_paint_the_same_image(
    warmed: tuple[DiffusersRunner, int], eager: DiffusersRunner
) -> None:
    runner, _ = warmed
    generation = Generation(
        prompt="a lighthouse",
        negative_prompt=None,
        guidance_scale=7.5,
        steps=3,
        width=96,
        height=64,
        seeds=[42, 43],
        scheduler="dpmpp_2m",
    )
    for a, b in zip(pixels(runner, generation), pixels(eager, generation), strict=True):
        assert a.std() > 1 and np.abs(a - b).max() <= 1


def test_cuda_gets_cuda_graphs_never_max_autotune(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    def fake_compile(fn: Any, **options: Any) -> Any:
        made.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    for cuda in (True, False):
        CompiledUNet(torch.nn.Identity(), backend="inductor", cuda=cuda)
    assert [options["mode"] for options in made] == ["reduce-overhead", None]
    assert all(options["dynamic"] is False and options["fullgraph"] for options in made)


def test_the_buckets_come_from_the_tiers_and_set_the_alive_timeout() -> None:
    tiers = Tiers.from_toml(
        '[tiers.a]\nqueue = "q.a"\nhardware = ["h100"]\ndefault_steps = 2\nmax_steps = 4\n'
        "max_side = 1536\nprice = 2\nmax_images = 4\n"
        "compile_sizes = [[1024, 1024], [1152, 896]]\n"
        '[tiers.b]\nqueue = "q.b"\nhardware = ["h100"]\ndefault_steps = 2\nmax_steps = 4\n'
        "max_side = 1024\nprice = 1\nmax_images = 2\ncompile_sizes = [[1024, 1024]]\n"
        '[tiers.c]\nqueue = "q.c"\nhardware = ["h100"]\ndefault_steps = 2\nmax_steps = 4\n'
        "max_side = 1024\nprice = 1\n"
    )
    plan = plan_for([tiers.get("a"), tiers.get("b")])
    assert plan.sizes == ((1024, 1024), (1152, 896)) and plan.max_images == 4
    assert len(plan.buckets) == 8
    native = plan_for([tiers.get("c")])
    assert native.buckets == [(None, 1)]  # the model's own size, one image
    # Waiting jobs run together up to batch_images: those calls are warmed buckets too, and
    # the time limit covers them.
    batched = tiers.get("c").model_copy(update={"batch_images": 3})
    assert plan_for([batched]).buckets == [(None, 1), (None, 2), (None, 3)]
    assert batched.time_limit(10, 1) == 10 + 4 * 3 > tiers.get("c").time_limit(10, 1)
    # The parent waits for the load and every bucket's compile; never less than the setting.
    assert alive_timeout(plan, 300) > alive_timeout(native, 300) >= 300
    assert alive_timeout(native, 5000) == 5000
    with pytest.raises(TierConfigError, match="compile size 1004x1024 must be multiples of 8"):
        Tiers.from_toml(
            '[tiers.d]\nqueue = "q.d"\nhardware = ["h100"]\ndefault_steps = 2\nmax_steps = 4\n'
            "max_side = 1024\nprice = 1\ncompile_sizes = [[1004, 1024]]\n"
        )


def test_the_compile_cache_lives_in_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    """SDQ_COMPILE_CACHE_DIR, else a folder under the sdq home, holds inductor's and Triton's
    caches; a worker without compile configures none."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert compiled.cache_dir(None) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert compiled.cache_dir(tmp_path / "cache") == tmp_path / "cache"
    assert (tmp_path / "cache").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")

    model = load_models(None).get("sdxl")
    home = Settings(home=tmp_path / "home", model=str(tiny_model), torch_compile=True)
    assert compiled.default_cache_dir(home) == tmp_path / "home" / "compile-cache"
    monkeypatch.setenv("SDQ_COMPILE_CACHE_DIR", str(tmp_path / "elsewhere"))
    chosen = Settings(home=tmp_path / "home", model=str(tiny_model), torch_compile=True)
    assert chosen.compile_cache_dir == tmp_path / "elsewhere"
    runner = DiffusersRunner.for_worker(chosen, model, [])
    assert runner.compile_cache == tmp_path / "elsewhere"
    plain = Settings(home=tmp_path / "home", model=str(tiny_model), torch_compile=False)
    assert DiffusersRunner.for_worker(plain, model, []).compile_cache is None
