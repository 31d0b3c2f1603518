"""Image-to-image: each family's img2img pipeline made from the loaded one (``from_pipe``,
one copy of the weights), and a job's way through ``execute`` with its input in real S3."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.apikeys import KeyStore
from common.job import Job, JobRequest, JobStatus, new_job_id, now
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from workers.execute import WorkerContext, execute
from workers.pipeline import DiffusersRunner, Generation


@pytest.fixture(scope="module")
def sdxl(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


@pytest.fixture(scope="module")
def sd15(tiny_sd15: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_sd15), family="sd15")
    runner.load()
    return runner


def picture(width: int = 80, height: int = 48) -> Image.Image:
    """A smooth picture, far from the noise the tiny models paint."""
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 128 * np.ones((1, 1))), axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def img2img(
    strength: float = 0.5,
    seeds: tuple[int, ...] = (1,),
    size: tuple[int, int] | None = (64, 64),
    steps: int = 4,
    image: Image.Image | None = None,
) -> Generation:
    width, height = size or (None, None)
    return Generation(
        prompt="a red kite",
        negative_prompt=None,
        guidance_scale=7.5,
        steps=steps,
        width=width,
        height=height,
        seeds=list(seeds),
        scheduler="euler",
        init_image=image or picture(),
        strength=strength,
    )


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(
    ("family", "pipeline"),
    [("sdxl", "StableDiffusionXLImg2ImgPipeline"), ("sd15", "StableDiffusionImg2ImgPipeline")],
)
def test_the_img2img_pipeline_shares_the_loaded_weights(
    family: str, pipeline: str, request: pytest.FixtureRequest
) -> None:
    runner: DiffusersRunner = request.getfixturevalue(family)
    made = runner.img2img
    assert type(made).__name__ == pipeline and runner.img2img is made  # made once
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(made, part) is getattr(runner.pipe, part), part
    if family == "sdxl":
        assert made.text_encoder_2 is runner.pipe.text_encoder_2
    assert runner.generate(img2img())[0].size == (64, 64)
    assert runner.img2img is made and made.unet is runner.pipe.unet


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_output_has_the_requested_size_and_strength_matters(
    family: str, request: pytest.FixtureRequest
) -> None:
    runner: DiffusersRunner = request.getfixturevalue(family)
    low, other_seed = runner.generate(img2img(0.5, seeds=(1, 2), size=(96, 64)))
    assert low.size == (96, 64)
    again = runner.generate(img2img(0.5, size=(96, 64)))[0]
    assert np.abs(as_array(low) - as_array(again)).max() <= 1  # same seed, same image
    assert np.abs(as_array(low) - as_array(other_seed)).mean() > 2
    high = runner.generate(img2img(1.0, size=(96, 64)))[0]
    assert np.abs(as_array(low) - as_array(high)).mean() > 5
    # Text to image of the same seed is yet another image: the input counts.
    plain = runner.generate(
        Generation(
            prompt="a red kite",
            negative_prompt=None,
            guidance_scale=7.5,
            steps=4,
            width=96,
            height=64,
            seeds=[1],
            scheduler="euler",
        )
    )[0]
    assert np.abs(as_array(low) - as_array(plain)).mean() > 5


def test_without_a_size_the_input_rounded_down_to_eights(sd15: DiffusersRunner) -> None:
    assert sd15.generate(img2img(size=None, image=picture(83, 61)))[0].size == (80, 56)


def test_progress_counts_the_steps_strength_leaves(sdxl: DiffusersRunner) -> None:
    seen: list[tuple[int, int]] = []
    sdxl.generate(img2img(0.5, steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    seen.clear()
    sdxl.generate(img2img(0.75, steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_a_strength_of_no_step_returns_the_input(sd15: DiffusersRunner) -> None:
    seen: list[tuple[int, int]] = []
    source = picture(64, 64)
    images = sd15.generate(
        img2img(0.1, seeds=(1, 2), image=source), on_step=lambda i, n: seen.append((i, n))
    )
    assert [image.size for image in images] == [(64, 64)] * 2
    assert all(np.array_equal(np.asarray(image), np.asarray(source)) for image in images)
    assert seen == []


def queued_img2img(
    store: JobStore, keys: KeyStore, storage: S3Storage, input_image: Image.Image, **fields: object
) -> Job:
    """A queued image-to-image job, its input stored as the API stores it (PNG)."""
    key = f"inputs/test-{uuid.uuid4().hex}.png"
    body = io.BytesIO()
    input_image.save(body, format="PNG")
    storage.put(key, body.getvalue(), "image/png", {})
    request = JobRequest.model_validate({"prompt": "a red kite", "strength": 0.5, **fields})
    job = Job(
        id=new_job_id(), key_id=keys.create(10)[1].id, tier=request.tier,
        status=JobStatus.QUEUED, request=request, seed=3, steps=4, cost=2, created_at=now(),
        init_image_key=key, prompt="a red kite, watercolor", negative_prompt="blurry",
    )  # fmt: skip
    store.create([job])
    return job


def test_execute_reads_its_input_from_s3(
    settings: Settings, store: JobStore, keys: KeyStore, storage: S3Storage, sdxl: DiffusersRunner
) -> None:
    job = queued_img2img(
        store, keys, storage, picture(83, 61), width=96, height=64, output_format="png"
    )
    ctx = WorkerContext(settings, store, storage, sdxl)
    assert execute(ctx, job.id) is JobStatus.SUCCEEDED
    done = store.get(job.id)
    assert [(image.width, image.height) for image in done.images] == [(96, 64)]
    with Image.open(io.BytesIO(storage.get(done.images[0].key).body)) as stored:
        assert stored.size == (96, 64)
    # What the pipeline ran, as the client would compute it: the same input, in memory.
    expected = sdxl.generate(
        Generation(
            prompt="a red kite, watercolor",
            negative_prompt="blurry",
            guidance_scale=7.5,
            steps=4,
            width=96,
            height=64,
            seeds=[3],
            scheduler="euler",
            init_image=picture(83, 61),
            strength=0.5,
        )
    )[0]
    with Image.open(io.BytesIO(storage.get(done.images[0].key).body)) as stored:
        assert np.abs(as_array(stored.convert("RGB")) - as_array(expected)).max() <= 1
    # Its last step, of the steps strength 0.5 leaves of 4.
    assert done.progress == {"step": 2, "total": 2}


def test_a_missing_input_fails_refunded(
    settings: Settings, store: JobStore, keys: KeyStore, storage: S3Storage, sdxl: DiffusersRunner
) -> None:
    job = queued_img2img(store, keys, storage, picture())
    storage.client.delete_object(Bucket=storage.bucket, Key=job.init_image_key)
    assert keys.credits(job.key_id) == 8
    assert execute(WorkerContext(settings, store, storage, sdxl), job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    # The object's name stays in the log: the owner reads plain words and a stable code.
    assert failed.error == "the input image is gone from storage"
    assert failed.error_code == "invalid_request"
    assert failed.refunded and keys.credits(job.key_id) == 10
