"""Worker start-up: check the model and the device against the tiers, then run Celery on
their queues of that model."""

from __future__ import annotations

import logging
import os
import sys

from pydantic import ValidationError

from common.device import check_tier, detect
from common.errors import HardwareMismatch, InvalidRequest
from common.models import ModelConfigError, load_models
from common.settings import Settings, get_settings
from common.tiers import load_tiers
from workers.compiled import alive_timeout, plan_for

log = logging.getLogger(__name__)


def run_worker(
    tier_names: list[str],
    *,
    model: str | None = None,
    concurrency: int = 1,
    loglevel: str = "INFO",
    gpu: str | None = None,
    name: str | None = None,
) -> None:
    """Serve ``tier_names``' queues of ``model`` (default: the first tier's default model),
    loading that model only; exits with status 2, saying why in one line, when a tier does
    not serve the model or the device may not serve a tier.

    A tier whose ``remote_fallback`` lists ``no_device`` is served from its remote API on a
    machine that lacks its hardware, instead of refusing, where the remote fallback is on.
    The hardware check comes before the other settings' checks: its refusal is the one that
    says what to change on this machine.
    """
    if gpu is not None:
        # One worker per GPU: pin before anything looks at the devices.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    settings = Settings.unchecked()
    tiers = load_tiers(settings.tiers_file)
    device = detect()
    remote: list[str] = []
    try:
        # Most expensive first: a worker serving several tiers takes the dearest job waiting.
        selected = sorted((tiers.get(name) for name in tier_names), key=lambda t: -t.price)
        model = model or tiers.get(tier_names[0]).default_model
        load_models(settings.models_file).get(model)
        for tier in selected:
            tier.serves(model)
        for tier in selected:
            try:
                check_tier(
                    device,
                    tier,
                    development=settings.env == "development",
                    override=settings.hardware_override,
                )
            except HardwareMismatch as exc:
                if not tier.falls_back("no_device"):
                    raise
                if model != tier.default_model:
                    raise HardwareMismatch(
                        f"{exc.message}; its remote API serves its default model "
                        f"{tier.default_model} only, not {model}"
                    ) from None
                if not settings.remote_enabled:
                    raise HardwareMismatch(
                        f"{exc.message}; or serve it from its remote API with "
                        "SDQ_REMOTE_FALLBACK=true and SDQ_REMOTE_API_KEY"
                    ) from None
                log.warning("%s; serving it from its remote API %s", exc.message, tier.remote_url)
                remote.append(tier.name)
        if remote and len(remote) < len(selected):
            raise HardwareMismatch(
                f"tiers {', '.join(remote)} would run remotely and the others locally; "
                "run them in separate workers"
            )
        get_settings()
    except (HardwareMismatch, InvalidRequest, ModelConfigError) as exc:
        print(f"sdq worker: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        print(f"sdq worker: invalid settings: {problems}", file=sys.stderr)
        raise SystemExit(2) from None
    if remote:
        os.environ["SDQ_RUNNER"] = "remote"
        get_settings.cache_clear()
    log.info("device: %s; serving model %s on %s", device.describe(), model, ", ".join(tier_names))

    from workers import tasks
    from workers.celery_app import app

    tasks.serve_model(model, [tier.name for tier in selected])
    if settings.torch_compile and device.count:
        # The parent waits this long for a pool child's load and compile warm-up.
        app.conf.worker_proc_alive_timeout = alive_timeout(
            plan_for(selected), settings.worker_proc_alive_timeout
        )
        log.info(
            "torch.compile: %d shape buckets to warm; a pool child may take %.0fs to start",
            len(plan_for(selected).buckets),
            app.conf.worker_proc_alive_timeout,
        )
    # The node is named for its tiers, and its model where that is not theirs (like lanes).
    node = "+".join(tier_names)
    if any(model != tier.default_model for tier in selected):
        node += f".{model}"
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(tier.queue_for(model) for tier in selected),
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--hostname",
            name or f"{node}@%h",
            "--loglevel",
            loglevel,
            "--task-events",
        ]
    )
