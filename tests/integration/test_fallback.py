"""Remote fallback policies against a stand-in Hotpot server, with real Valkey and S3."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import SecretStr

from common.apikeys import KeyStore
from common.errors import RemoteApiError
from common.job import ErrorCode, Job, JobStatus
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from common.tiers import Tiers
from tests.factories import PARKED, queued_job
from tests.hotpot_standin import KEY, Failure, StandIn
from workers.execute import WorkerContext, execute
from workers.pipeline import CudaOutOfMemory, DiffusersRunner, Generation
from workers.remote import CircuitBreaker, CircuitOpen, HotpotClient, RemoteRunners


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@pytest.fixture
def fresh(standin: StandIn) -> StandIn:
    standin.failures.clear()
    standin.calls.clear()
    return standin


def tiers_for(url: str, **extra: object) -> Tiers:
    options = "".join(f"{name} = {value}\n" for name, value in extra.items())
    return Tiers.from_toml(
        '[tiers.normal]\nqueue = "q.normal"\nhardware = ["h100"]\ndefault_steps = 2\n'
        "max_steps = 10\nmax_side = 1024\nprice = 2\n"
        f'remote_url = "{url}/stable-diffusion-normal"\n' + options
    )


def remote_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "remote_fallback": True,
            "remote_api_key": SecretStr(KEY),
            "remote_retry_base_seconds": 0.05,
            "remote_max_attempts": 3,
            "circuit_failures": 2,
            "circuit_cooldown_seconds": 60,
        }
    )


class Unloadable:
    backend = "local"
    model_name = "sdxl"
    load_error = "cannot load model 'sdxl': no such directory"

    def generate(self, generation: Generation, on_step: object = None) -> list[Image.Image]:
        raise AssertionError("never called")


class OutOfMemory(Unloadable):
    load_error = None
    calls = 0

    def generate(self, generation: Generation, on_step: object = None) -> list[Image.Image]:
        self.calls += 1
        raise CudaOutOfMemory()


def queued(
    store: JobStore, keys: KeyStore, *, allow_remote: bool = True, age: float = 0, **fields: object
) -> Job:
    return queued_job(
        store,
        keys,
        seed=7,
        age=age,
        allow_remote=allow_remote,
        width=96,
        height=64,
        **{"lane": PARKED, **fields},
    )


def recorded(store: JobStore, job: Job, **fields: object) -> Job:
    """``job`` with fields of its record set as the API sets them (its model, its input)."""
    store.redis.hset(f"sdq:job:{job.id}", mapping={k: json.dumps(v) for k, v in fields.items()})
    return job.model_copy(update=fields)


OPEN: list[RemoteRunners] = []


@pytest.fixture(autouse=True)
def close_runners() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def runners(settings: Settings) -> RemoteRunners:
    made = RemoteRunners(settings)
    OPEN.append(made)
    return made


def context(settings, store, storage, local, tiers) -> WorkerContext:
    settings = remote_settings(settings)
    return WorkerContext(settings, store, storage, local, runners(settings).for_url, tiers)


def test_load_failure_goes_remote_and_is_stored_like_a_local_result(
    settings, store, keys, storage: S3Storage, fresh: StandIn
) -> None:
    tiers = tiers_for(fresh.url, remote_fallback='["load_failed"]')
    job = queued(store, keys, output_format="webp")
    assert (
        execute(context(settings, store, storage, Unloadable(), tiers), job.id)
        is JobStatus.SUCCEEDED
    )
    done = store.get(job.id)
    assert done.backend == "remote" and done.remote_reason == "load_failed"
    assert done.model == f"remote:127.0.0.1:{fresh.port}"
    blob = storage.get(done.images[0].key)
    assert blob.metadata["backend"] == "remote" and blob.content_type == "image/webp"
    with Image.open(io.BytesIO(blob.body)) as image:
        assert image.size == (96, 64) and image.getpixel((0, 0))[0] == 7  # seed -> colour
    call = fresh.calls[0]
    assert (call["inputText"], call["seed"], call["steps"]) == ("a red kite", "7", "2")


def test_allow_remote_false_forbids_it(settings, store, keys, storage, fresh: StandIn) -> None:
    tiers = tiers_for(fresh.url, remote_fallback='["load_failed"]')
    job = queued(store, keys, allow_remote=False)
    assert (
        execute(context(settings, store, storage, Unloadable(), tiers), job.id) is JobStatus.FAILED
    )
    failed = store.get(job.id)
    assert failed.error == "the model could not be loaded" and failed.refunded
    assert failed.error_code is ErrorCode.MODEL_UNAVAILABLE
    assert fresh.calls == []


def test_no_policy_no_remote(settings, store, keys, storage, fresh: StandIn) -> None:
    tiers = tiers_for(fresh.url)
    job = queued(store, keys)
    assert (
        execute(context(settings, store, storage, Unloadable(), tiers), job.id) is JobStatus.FAILED
    )
    assert fresh.calls == []


def test_no_device_serves_remotely(settings, store, keys, storage, fresh: StandIn) -> None:
    tiers = tiers_for(fresh.url, remote_fallback='["no_device"]')
    job = queued(store, keys)
    assert execute(context(settings, store, storage, None, tiers), job.id) is JobStatus.SUCCEEDED
    assert store.get(job.id).remote_reason == "no_device"


def test_oom_after_the_local_retry_goes_remote(
    settings, store, keys, storage, fresh: StandIn
) -> None:
    tiers = tiers_for(fresh.url, remote_fallback='["oom"]')
    job = queued(store, keys)
    local = OutOfMemory()
    assert execute(context(settings, store, storage, local, tiers), job.id) is JobStatus.SUCCEEDED
    assert local.calls == 1 and store.get(job.id).remote_reason == "oom"


def test_remote_only_tier(settings, store, keys, storage, tiny_model: Path, fresh: StandIn) -> None:
    tiers = tiers_for(fresh.url, remote_only="true")
    job = queued(store, keys)
    local = DiffusersRunner(str(tiny_model))
    assert execute(context(settings, store, storage, local, tiers), job.id) is JobStatus.SUCCEEDED
    assert store.get(job.id).remote_reason == "remote_only" and local.pipe is None


def test_spillover_after_a_long_wait(
    settings, store, keys, storage, tiny_model: Path, fresh: StandIn
) -> None:
    tiers = tiers_for(fresh.url, remote_fallback='["spillover"]', spillover_after_seconds=30)
    local = DiffusersRunner(str(tiny_model))
    ctx = context(settings, store, storage, local, tiers)
    fresh_job, stale_job = queued(store, keys), queued(store, keys, age=31)
    assert execute(ctx, fresh_job.id) is JobStatus.SUCCEEDED
    assert execute(ctx, stale_job.id) is JobStatus.SUCCEEDED
    assert store.get(fresh_job.id).backend == "local"
    assert store.get(stale_job.id).remote_reason == "spillover"
    assert len(fresh.calls) == 1


def test_429_then_success_honours_retry_after(fresh: StandIn) -> None:
    fresh.fail(Failure(429, {"Retry-After": "1"}), Failure(500))
    client = HotpotClient(
        f"{fresh.url}/stable-diffusion-normal", KEY, timeout=5, max_attempts=3, retry_base=0.05,
        breaker=CircuitBreaker(5, 60),
    )  # fmt: skip
    body = client.generate({"inputText": "x", "seed": "1"})
    client.http.close()
    assert body[:2] == b"\xff\xd8" and client.credits_left == fresh.credits
    gaps = [b["at"] - a["at"] for a, b in zip(fresh.calls, fresh.calls[1:], strict=False)]
    assert len(fresh.calls) == 3 and gaps[0] >= 0.95


def test_client_errors_are_not_retried(fresh: StandIn) -> None:
    client = HotpotClient(
        f"{fresh.url}/stable-diffusion-normal", "wrong", timeout=5, max_attempts=3, retry_base=0.05,
        breaker=CircuitBreaker(5, 60),
    )  # fmt: skip
    with client.http, pytest.raises(RemoteApiError, match="remote API answered 403: bad key"):
        client.generate({"inputText": "x"})
    assert len(fresh.calls) == 1


def test_the_circuit_opens_and_jobs_fail_refunded(
    settings, store, keys, storage, fresh: StandIn
) -> None:
    tiers = tiers_for(fresh.url, remote_fallback='["load_failed"]')
    ctx = context(settings, store, storage, Unloadable(), tiers)
    fresh.fail(*[Failure(500)] * 6)  # two jobs x three attempts
    for _ in range(2):
        job = queued(store, keys)
        assert execute(ctx, job.id) is JobStatus.FAILED
        failed = store.get(job.id)
        assert (failed.error, failed.error_code) == (
            "the remote API failed",
            ErrorCode.REMOTE_FAILED,
        )
    calls = len(fresh.calls)
    job = queued(store, keys)
    assert execute(ctx, job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert failed.error == CircuitOpen.message and failed.refunded
    assert len(fresh.calls) == calls  # the open circuit sent nothing


def test_slow_remote_times_out(fresh: StandIn) -> None:
    fresh.fail(Failure(200, delay=1.5))
    client = HotpotClient(
        f"{fresh.url}/stable-diffusion-normal", KEY, timeout=0.5, max_attempts=1, retry_base=0.05,
        breaker=CircuitBreaker(5, 60),
    )  # fmt: skip
    with client.http, pytest.raises(RemoteApiError, match="unreachable"):
        client.generate({"inputText": "x"})


def test_schedulers_per_tier_change_the_image(tiny_model: Path) -> None:
    runner = DiffusersRunner(str(tiny_model))
    images = {
        name: runner.generate(
            Generation(
                prompt="a kite",
                negative_prompt=None,
                guidance_scale=5.0,
                steps=3,
                width=None,
                height=None,
                seeds=[3],
                scheduler=name,
            )
        )[0].tobytes()
        for name in ("euler", "dpmpp_2m", "euler")
    }
    again = runner.generate(
        Generation(
            prompt="a kite",
            negative_prompt=None,
            guidance_scale=5.0,
            steps=3,
            width=None,
            height=None,
            seeds=[3],
            scheduler="euler",
        )
    )[0]
    assert images["euler"] != images["dpmpp_2m"] and again.tobytes() == images["euler"]


def test_the_celery_parent_never_imports_torch() -> None:
    code = (
        "import sys, workers.celery_app, workers.tasks, workers.main, common.device;"
        "common.device.detect();"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_sdq_is_the_remote_of_another_sdq(
    settings, store, keys, storage, api_url: str, new_key, tiny_model: Path
) -> None:
    """A worker whose tier is remote-only, pointed at this very sdq's Hotpot endpoint."""
    tiers = Tiers.from_toml(
        '[tiers.normal]\nqueue = "q.chain"\nhardware = ["h100"]\ndefault_steps = 2\n'
        "max_steps = 10\nmax_side = 1024\nprice = 2\nremote_only = true\n"
        f'remote_url = "{api_url}/stable-diffusion-budget"\n'
    )
    upstream_key = new_key(10)
    chained = settings.model_copy(update={"remote_api_key": SecretStr(upstream_key)})
    ctx = WorkerContext(chained, store, storage, None, runners(chained).for_url, tiers)
    job = queued(store, keys)
    started = time.monotonic()
    assert execute(ctx, job.id) is JobStatus.SUCCEEDED
    done = store.get(job.id)
    assert done.backend == "remote" and done.model.startswith("remote:127.0.0.1:")
    with Image.open(io.BytesIO(storage.get(done.images[0].key).body)) as image:
        assert image.size == (96, 64)
    assert keys.authenticate(upstream_key).credits == 9  # the upstream charged its budget price
    assert time.monotonic() - started < 30


def test_without_the_opt_in_no_prompt_leaves(
    settings, store, keys, storage, tiny_model: Path, fresh: StandIn
) -> None:
    """A key alone is not consent: with SDQ_REMOTE_FALLBACK off the worker has no remote
    runner; a remote-only tier's job fails refunded and saying why, a stale job of a
    spill-over tier runs locally, and the stand-in never sees a prompt."""
    keyed = remote_settings(settings).model_copy(update={"remote_fallback": False})
    assert not keyed.remote_enabled and remote_settings(settings).remote_enabled
    local = DiffusersRunner(str(tiny_model))
    remote_only = tiers_for(fresh.url, remote_only="true")
    ctx = WorkerContext(keyed, store, storage, local, None, remote_only)
    job = queued(store, keys, credits=10)
    assert keys.get(job.key_id).credits == 8
    assert execute(ctx, job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert failed.refunded and failed.error == (
        "tier normal runs only on its remote API, and the remote fallback is off here "
        "(SDQ_REMOTE_FALLBACK, SDQ_REMOTE_API_KEY)"
    )
    assert keys.get(job.key_id).credits == 10
    spill = tiers_for(fresh.url, remote_fallback='["spillover"]', spillover_after_seconds=30)
    stale = queued(store, keys, age=31)
    ctx = WorkerContext(keyed, store, storage, local, None, spill)
    assert execute(ctx, stale.id) is JobStatus.SUCCEEDED
    assert store.get(stale.id).backend == "local"
    assert fresh.calls == []


def always_out_of_memory(runner: DiffusersRunner, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the runner's UNet run out of CUDA memory at every call; returns the batch sizes
    it was called with."""
    runner.load()
    batches: list[int] = []

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batches.append(sample.shape[0])
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(runner.pipe.unet, "forward", forward)
    return batches


def test_out_of_memory_twice_goes_remote_with_oom(
    settings, store, keys, storage, tiny_model: Path, fresh: StandIn, monkeypatch
) -> None:
    """The real runner: out of memory, then again in its tiled one-image retry, raises
    CudaOutOfMemory, and the tier's `oom` policy hands the job to its remote API."""
    local = DiffusersRunner(str(tiny_model))
    batches = always_out_of_memory(local, monkeypatch)
    tiers = tiers_for(fresh.url, remote_fallback='["oom"]')
    job = queued(store, keys, num_images=2)
    assert execute(context(settings, store, storage, local, tiers), job.id) is JobStatus.SUCCEEDED
    assert batches == [4, 2]  # two images with guidance, then the first alone
    assert not local.pipe.vae.use_tiling
    done = store.get(job.id)
    assert done.backend == "remote" and done.remote_reason == "oom" and len(fresh.calls) == 2


def test_out_of_memory_twice_without_the_policy_fails_refunded(
    settings, store, keys, storage, tiny_model: Path, fresh: StandIn, monkeypatch
) -> None:
    local = DiffusersRunner(str(tiny_model))
    always_out_of_memory(local, monkeypatch)
    tiers = tiers_for(fresh.url, remote_fallback='["load_failed"]')
    job = queued(store, keys, credits=10)
    assert execute(context(settings, store, storage, local, tiers), job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert failed.error == CudaOutOfMemory.message and failed.refunded
    assert keys.credits(job.key_id) == 10 and fresh.calls == []


def test_the_remote_api_runs_the_default_model_text_to_image_only(
    settings, store, keys, storage, fresh: StandIn
) -> None:
    """Another model's job, or an image-to-image one, never goes remote: where its local
    run fails it fails (refunded), and a remote-only tier refuses it saying why."""
    tiers = tiers_for(fresh.url, remote_fallback='["load_failed"]', models='["sdxl", "sd15"]')
    other_model = recorded(store, queued(store, keys), model_id="sd15", lane="normal.sd15")
    ctx = context(settings, store, storage, Unloadable(), tiers)
    ctx.model = "sd15"
    assert execute(ctx, other_model.id) is JobStatus.FAILED
    assert store.get(other_model.id).error == "the model could not be loaded"
    img2img = recorded(store, queued(store, keys), init_image_key="inputs/x.png")
    ctx = context(settings, store, storage, Unloadable(), tiers)
    assert execute(ctx, img2img.id) is JobStatus.FAILED
    assert store.get(img2img.id).refunded
    remote_only = tiers_for(fresh.url, remote_only="true", models='["sdxl", "sd15"]')
    ctx = context(settings, store, storage, None, remote_only)
    ctx.model = "sd15"
    job = recorded(store, queued(store, keys), model_id="sd15", lane="normal.sd15")
    assert execute(ctx, job.id) is JobStatus.FAILED
    assert store.get(job.id).error == (
        "tier normal runs only on its remote API, which serves model sdxl only, not sd15"
    )
    job = recorded(store, queued(store, keys), init_image_key="inputs/x.png")
    assert execute(context(settings, store, storage, None, remote_only), job.id) is (
        JobStatus.FAILED
    )
    assert store.get(job.id).error == (
        "tier normal runs only on its remote API, which does not run image-to-image"
    )
    assert fresh.calls == []
