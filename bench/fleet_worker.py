"""`sdq worker` with a runner that sleeps instead of generating: one simulated GPU of the fleet.

    python bench/fleet_worker.py --seconds-per-image 1.5 worker --tier budget --name w0@fleet

Everything after the bench's own option is `sdq worker`'s command line, run by sdq's own CLI:
the real Celery worker, job store, encoding, upload and progress. Only the runner the worker
would load (``workers.tasks.DiffusersRunner``) is replaced, in the Celery parent before the
pool forks, so production code gains no bench-only runner. torch and diffusers are never
imported; each pool child logs that it checked (``fleet runner: ... torch=False``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.pipeline import Generation, StepCallback  # noqa: E402

log = logging.getLogger("bench.fleet_worker")

#: What a pool child logs once its runner is ready; bench/fleet.py reads it from the log.
READY = "fleet runner:"


class SleepRunner:
    """Takes ``seconds_per_image`` per image, calling ``on_step`` after each of the job's
    steps as the pipeline does, and returns noise images of the asked size (64 px by default:
    encoding a full-size image is each GPU machine's own CPU, not the shared control plane's)."""

    backend = "local"
    seconds_per_image = 1.5

    def __init__(self, model: str, **_options: object) -> None:
        self.model = model
        self.load_error: str | None = None
        self._noise: dict[tuple[int, int], Image.Image] = {}

    @classmethod
    def for_worker(cls, *_args: object, **_kwargs: object) -> SleepRunner:
        """The factory ``workers.tasks`` calls (as ``DiffusersRunner.for_worker``)."""
        return cls("fleet-sleep")

    @property
    def model_name(self) -> str:
        return "fleet-sleep"

    def load(self) -> None:
        """Nothing to load; note whether anything imported torch, which would cost each
        worker about a second of start-up and hundreds of MB."""
        heavy = {name: name in sys.modules for name in ("torch", "diffusers", "transformers")}
        flags = " ".join(f"{name}={imported}" for name, imported in heavy.items())
        log.info("%s %.3fs an image, pid %d, %s", READY, self.seconds_per_image, os.getpid(), flags)

    def generate(
        self, generation: Generation, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        steps = max(1, generation.steps_run)
        pause = self.seconds_per_image * len(generation.seeds) / steps
        for step in range(1, steps + 1):
            time.sleep(pause)
            if on_step is not None:
                on_step(step, steps)
        size = (generation.width or 64, generation.height or 64)
        if size not in self._noise:
            # Noise, so that JPEG and PNG sizes are an image's, not a flat colour's.
            self._noise[size] = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
        return [self._noise[size].copy() for _ in generation.seeds]


def patch_runner(seconds_per_image: float) -> None:
    """Make the worker's runner factory build ``SleepRunner``s; fails loudly when the
    factory moved, rather than starting workers that load the real model."""
    from workers import tasks

    if not hasattr(tasks, "DiffusersRunner"):
        raise SystemExit(
            "bench/fleet_worker.py: workers.tasks no longer makes its runner from "
            "DiffusersRunner; update patch_runner to the new factory"
        )
    SleepRunner.seconds_per_image = seconds_per_image
    tasks.DiffusersRunner = SleepRunner  # type: ignore[misc,assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds-per-image", type=float, default=1.5)
    args, sdq_argv = parser.parse_known_args()
    patch_runner(args.seconds_per_image)
    from producer.cli import app

    app(sdq_argv, prog_name="sdq")


if __name__ == "__main__":
    main()
