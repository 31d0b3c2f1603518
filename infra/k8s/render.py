"""Render infra/k8s/workers.yaml from the tiers file: per tier and model it serves, a worker
Deployment pinned to the tier's GPU classes and a KEDA ScaledObject on that pair's queue.

    python infra/k8s/render.py [--tiers path/to/tiers.toml] > infra/k8s/workers.yaml

Celery's Redis transport keeps one list per priority (``sdq.normal``, ``sdq.normal:1`` ...
``sdq.normal:9``), so each ScaledObject reads all ten and sums them with a KEDA scaling
modifier. Nodes carry their class as the label ``sdq.dev/gpu-class`` (t4, l4, a10g, l40s,
a100, h100, h200).

A tier's ``min_workers`` (tiers file, default 1) is each pair's ``minReplicaCount``; with 0
KEDA scales the pair to zero once its lists stayed empty for ``cooldownPeriod`` and wakes it
when their sum exceeds ``ACTIVATION_JOBS``. With a formula, KEDA decides activity on the
summed metric (``scalingModifiers.activationTarget``), not per trigger
(``activationListLength``), so the threshold is set there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.tiers import Tier, load_tiers  # noqa: E402
from common.transport import PRIORITY_STEPS, queue_key  # noqa: E402

NAMESPACE = "sdq"
IMAGE = "sdq-worker:latest"
#: Longer than the longest job, so a scaled-down worker finishes what it runs.
GRACE_SECONDS = 900
JOBS_PER_WORKER = 2
MAX_WORKERS = 8
#: A pair scaled to zero wakes when more jobs than this wait (summed over its priorities).
ACTIVATION_JOBS = 0
#: Seconds a pair's lists stay empty before KEDA scales it to zero (min_workers 0 only;
#: between 1 and MAX_WORKERS the HPA's own stabilization window applies).
COOLDOWN_SECONDS = 600


def priority_lists(queue: str) -> list[str]:
    return [queue_key(queue, p) for p in PRIORITY_STEPS]


def worker_name(tier: Tier, model: str) -> str:
    """``sdq-worker-<tier>`` for the tier's default model, ``...-<tier>-<model>`` otherwise."""
    suffix = "" if model == tier.default_model else f"-{model}"
    return f"sdq-worker-{tier.name}{suffix}"


def deployment(tier: Tier, model: str) -> dict[str, Any]:
    name = worker_name(tier, model)
    labels = {
        "app": name,
        "sdq.dev/component": "worker",
        "sdq.dev/tier": tier.name,
        "sdq.dev/model": model,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": labels,
        },
        "spec": {
            # KEDA owns the count from here on; this is what a first apply starts.
            "replicas": tier.min_workers,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "terminationGracePeriodSeconds": GRACE_SECONDS,
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "sdq.dev/gpu-class",
                                                "operator": "In",
                                                "values": list(tier.hardware),
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [
                        {
                            "name": "worker",
                            "image": IMAGE,
                            "args": ["sdq", "worker", "--tier", tier.name, "--model", model],
                            "envFrom": [
                                {"configMapRef": {"name": "sdq-config"}},
                                {"secretRef": {"name": "sdq-secrets"}},
                            ],
                            "resources": {
                                "limits": {"nvidia.com/gpu": 1},
                                "requests": {"cpu": "2", "memory": "16Gi"},
                            },
                            "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                        }
                    ],
                    "volumes": [{"name": "models", "emptyDir": {}}],
                },
            },
        },
    }


def scaled_object(tier: Tier, model: str) -> dict[str, Any]:
    name, queue_name = worker_name(tier, model), tier.queue_for(model)
    lists = priority_lists(queue_name)
    triggers = [
        {
            "type": "redis",
            "name": f"p{index}",
            "metadata": {
                "addressFromEnv": "SDQ_REDIS_ADDRESS",
                "passwordFromEnv": "REDIS_PASSWORD",
                "listName": queue,
                "listLength": str(JOBS_PER_WORKER),
            },
        }
        for index, queue in enumerate(lists)
    ]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"sdq.dev/queue": queue_name},
        },
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": tier.min_workers,
            "maxReplicaCount": MAX_WORKERS,
            "cooldownPeriod": COOLDOWN_SECONDS,
            "advanced": {
                "scalingModifiers": {
                    "formula": " + ".join(f"p{i}" for i in range(len(lists))),
                    "target": str(JOBS_PER_WORKER),
                    "activationTarget": str(ACTIVATION_JOBS),
                    "metricType": "AverageValue",
                }
            },
            "triggers": triggers,
        },
    }


def render(tiers_file: Path | None) -> str:
    documents: list[dict[str, Any]] = []
    for tier, model, _lane, _queue in load_tiers(tiers_file).lanes():
        documents += [deployment(tier, model), scaled_object(tier, model)]
    header = (
        "# Rendered by infra/k8s/render.py from the tiers file; do not edit by hand.\n"
        f"# KEDA adds a worker per {JOBS_PER_WORKER} jobs waiting (all priorities summed), up to"
        f" {MAX_WORKERS}.\n"
        "# minReplicaCount is the tier's min_workers; a pair at 0 wakes when more than"
        f" activationTarget ({ACTIVATION_JOBS})\n"
        "# jobs wait (with scalingModifiers KEDA ignores each trigger's activationListLength)"
        f" and sleeps\n# again {COOLDOWN_SECONDS} s after its lists emptied.\n"
    )
    return header + yaml.safe_dump_all(documents, sort_keys=False, width=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiers", type=Path, default=None)
    sys.stdout.write(render(parser.parse_args().tiers))


if __name__ == "__main__":
    main()
