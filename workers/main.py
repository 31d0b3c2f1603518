"""Worker start-up: check the device against the tiers, then run Celery on their queues."""

from __future__ import annotations

import logging
import sys

from common.errors import HardwareMismatch, InvalidRequest
from common.settings import get_settings
from common.tiers import load_tiers
from workers.device import check_tier, detect

log = logging.getLogger(__name__)


def run_worker(tier_names: list[str], *, concurrency: int = 1, loglevel: str = "INFO") -> None:
    """Serve ``tier_names``' queues; exits with status 2 when the device may not serve one."""
    settings = get_settings()
    tiers = load_tiers(settings.tiers_file)
    device = detect()
    try:
        # Most expensive first: a worker serving several tiers takes the dearest job waiting.
        selected = sorted((tiers.get(name) for name in tier_names), key=lambda t: -t.price)
        for tier in selected:
            check_tier(
                device,
                tier,
                development=settings.env == "development",
                override=settings.hardware_override,
            )
    except (HardwareMismatch, InvalidRequest) as exc:
        print(f"sdq worker: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("device: %s; serving %s", device.describe(), ", ".join(tier_names))

    from workers.celery_app import app

    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(tier.queue for tier in selected),
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--hostname",
            f"{'+'.join(tier_names)}@%h",
            "--loglevel",
            loglevel,
            "--task-events",
        ]
    )
