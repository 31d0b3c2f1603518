"""CUDA out of memory on today's diffusers, end to end on the CPU (issue 18): the tiny
model's UNet raises ``torch.cuda.OutOfMemoryError``, the runner retries one image a call
with the VAE tiled (``pipe.vae.enable_tiling()``: diffusers 0.42 has no
``pipe.enable_vae_tiling()``), and when that fails too the tier's ``oom`` policy sends the
job to its remote API. Real Valkey, real S3, the stand-in Hotpot server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from common.apikeys import KeyStore
from common.job import JobStatus
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from tests.factories import PARKED, queued_job
from tests.hotpot_standin import StandIn
from tests.integration.test_fallback import context, tiers_for
from workers.execute import WorkerContext, execute
from workers.pipeline import CudaOutOfMemory, DiffusersRunner

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


def pixels(storage: S3Storage, store: JobStore, job_id: str) -> list[np.ndarray]:
    done = store.get(job_id)
    return [
        np.asarray(Image.open(io.BytesIO(storage.get(image.key).body)).convert("RGB"))
        for image in done.images
    ]


def two_image_job(store: JobStore, keys: KeyStore) -> str:
    return queued_job(
        store,
        keys,
        seed=321,
        steps=3,
        num_images=2,
        width=64,
        height=64,
        output_format="png",
        lane=PARKED,
    ).id


def test_out_of_memory_once_the_tiled_retry_paints_the_same_images(
    settings: Settings,
    store: JobStore,
    keys: KeyStore,
    storage: S3Storage,
    runner: DiffusersRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job succeeds on the local GPU with the images it gets without the failure; its
    progress runs forward over both images, and tiling is off again afterwards."""
    ctx = WorkerContext(settings, store, storage, runner)
    plain = two_image_job(store, keys)
    assert execute(ctx, plain) is JobStatus.SUCCEEDED

    calls: list[tuple[int, bool]] = []
    forward = runner.pipe.unet.forward

    def flaky(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((sample.shape[0], runner.pipe.vae.use_tiling))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError(OOM)
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(runner.pipe.unet, "forward", flaky)
    steps: list[tuple[int, int]] = []
    progress = store.progress

    def published(job: Any, batch: Any) -> Any:
        steps.extend((step, total) for step, total, _ in batch)
        return progress(job, batch)

    monkeypatch.setattr(store, "progress", published)
    retried = two_image_job(store, keys)
    assert execute(ctx, retried) is JobStatus.SUCCEEDED
    # The batch of two with guidance (4), then each image alone (2), tiled, three steps each.
    assert calls == [(4, False)] + [(2, True)] * 6
    assert not runner.pipe.vae.use_tiling
    done = store.get(retried)
    assert done.backend == "local" and done.remote_reason is None
    for got, want in zip(
        pixels(storage, store, retried), pixels(storage, store, plain), strict=True
    ):
        assert got.std() > 1  # noise, not a blank image
        # Batched kernels may round a rare pixel by one level.
        assert np.abs(got.astype(int) - want).max() <= 1
    assert steps == [(step, 6) for step in range(1, 7)]


def test_out_of_memory_in_the_tiled_retry_goes_remote_with_oom(
    settings: Settings,
    store: JobStore,
    keys: KeyStore,
    storage: S3Storage,
    runner: DiffusersRunner,
    standin: StandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The UNet runs out of memory on the batch, and the tiled VAE on the retry's first
    decode: CudaOutOfMemory, and the tier's `oom` policy hands the job to its remote API,
    whose images are stored like local ones."""
    standin.calls.clear()
    unet_calls: list[int] = []
    forward = runner.pipe.unet.forward

    def unet(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        unet_calls.append(sample.shape[0])
        if len(unet_calls) == 1:
            raise torch.cuda.OutOfMemoryError(OOM)
        return forward(sample, *args, **kwargs)

    decodes: list[bool] = []

    def decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append(runner.pipe.vae.use_tiling)
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(runner.pipe.unet, "forward", unet)
    monkeypatch.setattr(runner.pipe.vae, "decode", decode)
    tiers = tiers_for(standin.url, remote_fallback='["oom"]')
    job = queued_job(store, keys, seed=7, num_images=2, width=96, height=64, lane=PARKED)
    assert execute(context(settings, store, storage, runner, tiers), job.id) is JobStatus.SUCCEEDED
    assert unet_calls == [4, 2, 2]  # the batch, then the first image alone (two steps)
    assert decodes == [True]
    assert not runner.pipe.vae.use_tiling
    done = store.get(job.id)
    assert done.backend == "remote" and done.remote_reason == "oom"
    assert [call["seed"] for call in standin.calls] == ["7", "8"]
    with Image.open(io.BytesIO(storage.get(done.images[1].key).body)) as image:
        assert image.size == (96, 64)


def test_out_of_memory_without_the_policy_fails_refunded(
    settings: Settings,
    store: JobStore,
    keys: KeyStore,
    storage: S3Storage,
    runner: DiffusersRunner,
    standin: StandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin.calls.clear()

    def unet(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(runner.pipe.unet, "forward", unet)
    tiers = tiers_for(standin.url, remote_fallback='["load_failed"]')
    job = queued_job(store, keys, credits=10, seed=7, lane=PARKED)
    assert execute(context(settings, store, storage, runner, tiers), job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert failed.error == CudaOutOfMemory.message and failed.refunded
    assert keys.credits(job.key_id) == 10 and standin.calls == []
    assert not runner.pipe.vae.use_tiling
