"""The tiny SD 1.5 and SD 2.1 pipelines: real from_pretrained loading through the runner,
deterministic by seed, and SD 2.1's v-prediction kept through every tier scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.models import Family, load_models
from common.settings import Settings
from workers.pipeline import SCHEDULERS, DiffusersRunner, Generation


@pytest.fixture(scope="module")
def sd15(tiny_sd15: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_sd15), family="sd15")
    runner.load()
    return runner


@pytest.fixture(scope="module")
def sd21(tiny_sd21: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_sd21), family="sd21")
    runner.load()
    return runner


def pixels(runner: DiffusersRunner, seeds: list[int], scheduler: str = "euler") -> list[np.ndarray]:
    generation = Generation(
        prompt="a red bicycle",
        negative_prompt=None,
        guidance_scale=7.5,
        steps=2,
        width=64,
        height=64,
        seeds=seeds,
        scheduler=scheduler,
    )
    return [np.asarray(image) for image in runner.generate(generation)]


@pytest.mark.parametrize(("family", "prediction"), [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_it_is_a_saved_stable_diffusion_pipeline(
    family: str, prediction: str, request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(f"tiny_{family}")
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and not index["requires_safety_checker"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (directory / part).is_dir()
    assert "text_encoder_2" not in index
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    encoder = json.loads((directory / "text_encoder" / "config.json").read_text())
    assert encoder["hidden_act"] == ("gelu" if family == "sd21" else "quick_gelu")


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_same_seed_same_pixels_other_seed_other_pixels(
    family: str, request: pytest.FixtureRequest
) -> None:
    runner: DiffusersRunner = request.getfixturevalue(family)
    assert type(runner.pipe).__name__ == "StableDiffusionPipeline"
    first, other = pixels(runner, [42, 43])
    again = pixels(runner, [42])[0]
    assert first.shape == (64, 64, 3) and first.std() > 1  # noise, not a blank image
    # One generator per image: batched kernels may round a rare pixel by one level.
    assert np.abs(first.astype(int) - again).max() <= 1
    assert np.abs(first.astype(int) - other).mean() > 10


def test_the_families_paint_differently(sd15: DiffusersRunner, sd21: DiffusersRunner) -> None:
    assert np.abs(pixels(sd15, [3])[0].astype(int) - pixels(sd21, [3])[0]).mean() > 10


def test_v_prediction_survives_every_tier_scheduler(sd21: DiffusersRunner) -> None:
    """A tier's scheduler is made from the model's own config: SD 2.1 stays v-prediction,
    and no scheduler inherits another's options (Karras sigmas) whatever the order."""
    for name in [*SCHEDULERS, "dpmpp_2m"]:
        sd21.generate(
            Generation(
                prompt="x",
                negative_prompt=None,
                guidance_scale=5.0,
                steps=1,
                width=64,
                height=64,
                seeds=[0],
                scheduler=name,
            )
        )
        config = sd21.pipe.scheduler.config
        assert type(sd21.pipe.scheduler).__name__ == SCHEDULERS[name][0]
        assert config.prediction_type == "v_prediction", name
        assert bool(config.get("use_karras_sigmas")) == (name == "dpmpp_2m_karras"), name


def test_sd15_stays_epsilon(sd15: DiffusersRunner) -> None:
    sd15.generate(
        Generation(
            prompt="x",
            negative_prompt=None,
            guidance_scale=5.0,
            steps=1,
            width=64,
            height=64,
            seeds=[0],
            scheduler="dpmpp_2m_karras",
        )
    )
    assert sd15.pipe.scheduler.config.prediction_type == "epsilon"


def test_v_prediction_is_what_it_runs(sd21: DiffusersRunner) -> None:
    """The same weights read as epsilon paint another image: the kept config matters."""
    v = pixels(sd21, [8])[0]
    scheduler = sd21.scheduler("euler")
    scheduler.register_to_config(prediction_type="epsilon")
    try:
        epsilon = pixels(sd21, [8])[0]
    finally:
        scheduler.register_to_config(prediction_type="v_prediction")
    assert np.abs(v.astype(int) - epsilon).mean() > 5


def test_development_loads_each_family_from_home(
    tmp_path: Path, tiny_sd15: Path, tiny_sd21: Path, tiny_model: Path
) -> None:
    """No source override: in development each model loads the tiny pipeline of its family
    under SDQ_HOME; SDQ_MODEL_SOURCES, and SDQ_MODEL for sdxl, override it; production
    loads the models file's source."""
    models = load_models()
    (tmp_path / "models").mkdir()
    for family, built in (("sd15", tiny_sd15), ("sd21", tiny_sd21), ("sdxl", tiny_model)):
        (tmp_path / "models" / f"tiny-{family}").symlink_to(built)
    dev = Settings(_env_file=None, env="development", home=tmp_path)
    assert dev.model_source(models.get("sd21")) == str(tmp_path / "models" / "tiny-sd21")
    runner = DiffusersRunner(dev.model_source(models.get("sd15")), family="sd15")
    assert pixels(runner, [4])[0].shape == (64, 64, 3)
    assert runner.model_name == "tiny-sd15"
    overridden = dev.model_copy(update={"model_sources": {"sd15": "/m/sd15"}, "model": "/m/xl"})
    assert overridden.model_source(models.get("sd15")) == "/m/sd15"
    assert overridden.model_source(models.get("sdxl")) == "/m/xl"
    assert overridden.model_source(models.get("sd21")) == str(tmp_path / "models" / "tiny-sd21")
    prod = dev.model_copy(update={"env": "production"})
    assert prod.model_source(models.get("sd21")) == "stabilityai/stable-diffusion-2-1"


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_the_build_is_reproducible(
    family: Family, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from workers.tiny import build_tiny

    runner: DiffusersRunner = request.getfixturevalue(family)
    rebuilt = DiffusersRunner(str(build_tiny(tmp_path / family, family)), family=family)
    assert np.array_equal(pixels(rebuilt, [9])[0], pixels(runner, [9])[0])
