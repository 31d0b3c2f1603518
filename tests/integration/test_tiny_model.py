"""The tiny SDXL pipeline: real from_pretrained loading, deterministic by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workers.pipeline import Generation, SdxlRunner


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> SdxlRunner:
    runner = SdxlRunner(str(tiny_model))
    runner.load()
    return runner


def generate(
    runner: SdxlRunner, seeds: list[int], prompt: str = "a red bicycle"
) -> list[np.ndarray]:
    generation = Generation(prompt, None, 7.5, 3, None, None, seeds)
    return [np.asarray(image) for image in runner.generate(generation)]


def test_it_is_a_saved_sdxl_pipeline(tiny_model: Path) -> None:
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (tiny_model / part).is_dir()


def test_same_seed_same_pixels(runner: SdxlRunner) -> None:
    first, second = generate(runner, [42]), generate(runner, [42])
    assert first[0].shape == (64, 64, 3)
    assert np.array_equal(first[0], second[0])
    assert first[0].std() > 1  # noise, not a blank image


def test_other_seed_other_pixels(runner: SdxlRunner) -> None:
    a, b = generate(runner, [1, 2])
    assert np.abs(a.astype(int) - b).mean() > 20
    # One generator per image: the second image of a batch is seed 2's image. Batched
    # kernels may round differently, by at most one level in a rare pixel.
    alone = generate(runner, [2])[0]
    assert np.abs(b.astype(int) - alone).max() <= 1


def test_steps_are_reported(runner: SdxlRunner) -> None:
    seen: list[tuple[int, int]] = []
    runner.generate(
        Generation("x", None, 5.0, 4, 64, 64, [0]), on_step=lambda i, n: seen.append((i, n))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_the_build_is_reproducible(tmp_path: Path, runner: SdxlRunner) -> None:
    from workers.tiny import build_tiny

    rebuilt = SdxlRunner(str(build_tiny(tmp_path / "again")))
    assert np.array_equal(generate(rebuilt, [9])[0], generate(runner, [9])[0])
