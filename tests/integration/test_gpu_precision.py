"""Precision (issue 18): the tier's ``precision`` picks the dtype by the device, bf16 decodes
without the VAE upcast, the watermarker is off, and a seed's noise is drawn in fp32 on the
CPU so that it paints the same image whatever the dtype. The tiny SDXL pipeline on the CPU;
bf16 is forced there (``dtype=``), as a GPU's ``auto`` would pick it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from common.models import load_models
from common.settings import Settings
from common.tiers import Tiers
from workers.pipeline import DiffusersRunner, Generation
from workers.precision import resolve, seeded_latents


@pytest.fixture(scope="module")
def fp32(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


@pytest.fixture(scope="module")
def bf16(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model), dtype="bf16")
    runner.load()
    return runner


def image(runner: DiffusersRunner, seed: int, scheduler: str = "euler") -> np.ndarray:
    generation = Generation(
        prompt="a red bicycle",
        negative_prompt=None,
        guidance_scale=7.5,
        steps=4,
        width=64,
        height=64,
        seeds=[seed],
        scheduler=scheduler,
    )
    return np.asarray(runner.generate(generation)[0]).astype(int)


@pytest.mark.parametrize(
    ("precision", "capability", "dtype"),
    [
        ("auto", (9, 0), "bf16"),  # H100, H200
        ("auto", (8, 0), "bf16"),  # A100
        ("auto", (8, 9), "bf16"),  # L4, L40S
        ("auto", (7, 5), "fp16"),  # T4
        ("bf16", (7, 5), "fp16"),  # asked, but the card has none
        ("fp16", (9, 0), "fp16"),
        ("fp32", (9, 0), "fp32"),
        ("auto", None, "fp32"),  # the CPU
        ("bf16", None, "fp32"),
        ("fp16", None, "fp32"),
    ],
)
def test_the_dtype_follows_the_tier_and_the_device(
    precision: Any, capability: tuple[int, int] | None, dtype: str
) -> None:
    assert resolve(precision, capability) == dtype


def test_a_seed_draws_the_same_noise_in_every_dtype(
    fp32: DiffusersRunner, bf16: DiffusersRunner
) -> None:
    """The initial latents: fp32 draws from the seed's CPU generator, then cast, so bf16's
    are fp32's rounded; and fp32's are the ones diffusers itself draws (every seed keeps
    the image it had before)."""
    generation = Generation(
        prompt="x",
        negative_prompt=None,
        guidance_scale=7.5,
        steps=2,
        width=96,
        height=64,
        seeds=[11, 12],
    )
    wide = fp32._latents(fp32.pipe, generation, [11, 12])
    half = bf16._latents(bf16.pipe, generation, [11, 12])
    assert wide.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert wide.shape == (2, 4, 32, 48)  # the tiny VAE scales by 2
    assert torch.equal(half, wide.to(torch.bfloat16))
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (11, 12)]
    assert torch.equal(wide, randn_tensor((2, 4, 32, 48), generator=generators))
    # One image alone draws what it draws in a batch.
    assert torch.equal(seeded_latents([12], (4, 32, 48), torch.float32, "cpu")[0], wide[1])


def test_a_seed_paints_the_same_image_in_bf16_and_fp32(
    fp32: DiffusersRunner, bf16: DiffusersRunner
) -> None:
    assert bf16.pipe.unet.dtype == torch.bfloat16 and bf16.pipe.vae.dtype == torch.bfloat16
    for seed in (1, 2):
        wide, half = image(fp32, seed), image(bf16, seed)
        other = image(fp32, seed + 100)
        # bf16 rounds (a level or so on average); another seed is another image.
        assert np.abs(wide - half).mean() < 2.0
        assert np.abs(wide - other).mean() > 20


def test_bf16_decodes_without_the_vae_upcast_and_no_watermark(
    bf16: DiffusersRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bf16.pipe.vae.config.force_upcast is False
    assert bf16.pipe.watermark is None
    upcasts: list[Any] = []
    monkeypatch.setattr(bf16.pipe, "upcast_vae", lambda: upcasts.append(1))
    seen: list[torch.dtype] = []
    decode = bf16.pipe.vae.decode

    def spy(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(latents.dtype)
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(bf16.pipe.vae, "decode", spy)
    image(bf16, 3)
    assert upcasts == [] and seen == [torch.bfloat16]


def test_fp16_with_the_stock_vae_keeps_its_upcast_and_says_so(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stock SDXL VAE overflows in fp16: diffusers must upcast it (slowly) unless an
    fp16-safe VAE is set, which the log names."""
    with caplog.at_level(logging.WARNING, "workers.pipeline"):
        stock = DiffusersRunner(str(tiny_model), dtype="fp16")
        stock.load()
    assert stock.pipe.unet.dtype == torch.float16
    assert stock.pipe.vae.config.force_upcast is True
    assert "SDQ_VAE_MODEL" in caplog.text
    safe = DiffusersRunner(str(tiny_model), dtype="fp16", vae=str(tiny_model / "vae"))
    safe.load()
    assert safe.pipe.vae.config.force_upcast is False


def test_a_worker_takes_its_tiers_precision(tiny_model: Path) -> None:
    tiers = Tiers.from_toml(
        '[tiers.a]\nqueue = "q.a"\nhardware = ["h100"]\ndefault_steps = 2\nmax_steps = 4\n'
        'max_side = 1024\nprice = 1\nprecision = "bf16"\n'
        '[tiers.b]\nqueue = "q.b"\nhardware = ["t4"]\ndefault_steps = 2\nmax_steps = 4\n'
        "max_side = 1024\nprice = 1\n"
    )
    settings = Settings(model=str(tiny_model))
    model = load_models(None).get("sdxl")
    runner = DiffusersRunner.for_worker(settings, model, [tiers.get("a"), tiers.get("b")])
    assert runner.precision == "bf16"
    assert DiffusersRunner.for_worker(settings, model, [tiers.get("b")]).precision == "auto"
    runner.load()
    assert runner.dtype == "fp32"  # the CPU
