"""What a PromQL expression reads: its metric names, the labels it matches or groups by and
the label values it matches, checked against what sdq exposes (common/metrics.py), so that
the alert rules and the dashboard cannot name a metric, a label or a value that does not
exist."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import pytest

from common.job import JobStatus
from common.metrics import COUNTERS, GAUGES, HISTOGRAMS
from common.tiers import FallbackPolicy
from common.webhooks import DeliveryState

ROOT = Path(__file__).resolve().parents[2]

#: Exported by redis_exporter (https://github.com/oliver006/redis_exporter), which the
#: compose profile `monitoring` runs and the README documents.
EXPORTER: dict[str, list[str]] = {
    "redis_memory_used_bytes": [],
    "redis_memory_max_bytes": [],
}
#: Prometheus's own series for each target.
BUILTIN: dict[str, list[str]] = {"up": []}
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}
#: Every value of the labels whose values the code enumerates: a matcher on another value
#: (``status="suceeded"``) would select nothing, and an alert on it would never fire.
LABEL_VALUES: dict[str, set[str]] = {
    "status": {status.value for status in JobStatus},
    # An attempt that leaves its delivery pending is counted as `retry` (common/webhooks.py).
    "outcome": (set(get_args(DeliveryState)) - {"pending"}) | {"retry"},
    "reason": set(get_args(FallbackPolicy)),
}

_FUNCTIONS_AND_KEYWORDS = {
    "abs", "and", "avg", "bool", "by", "count", "delta", "deriv", "group_left", "group_right",
    "histogram_quantile", "ignoring", "increase", "irate", "label_values", "max", "min",
    "offset", "on", "or", "rate", "sum", "topk", "unless", "vector", "without", "clamp_min",
}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed here: apt-get install prometheus")
    return path


def exposed() -> dict[str, list[str]]:
    """Every series name sdq's /metrics can serve, with its labels."""
    names: dict[str, list[str]] = {}
    for name, (_doc, labels) in COUNTERS.items():
        names[name] = labels
    for name, (_doc, labels) in GAUGES.items():
        names[name] = labels
    for name, (_doc, labels) in HISTOGRAMS.items():
        names[f"{name}_bucket"] = [*labels, "le"]
        names[f"{name}_sum"] = names[f"{name}_count"] = labels
    return names


@dataclass
class Reads:
    metrics: set[str] = field(default_factory=set)
    #: (metric, label) of each label matcher, as in ``metric{label="x"}``.
    matchers: set[tuple[str, str]] = field(default_factory=set)
    #: Labels of ``by``, ``without``, ``on`` and ``ignoring`` clauses.
    grouping: set[str] = field(default_factory=set)
    #: (label, value) of each ``=`` matcher, and of each alternative of a ``=~`` matcher
    #: that is a plain alternation (``status=~"succeeded|failed"``); other regexes and
    #: Grafana variables (``$tier``) are left out.
    values: set[tuple[str, str]] = field(default_factory=set)


def reads(expr: str) -> Reads:
    """The metric names and labels ``expr`` reads (enough of PromQL for sdq's own files)."""
    found = Reads()
    for matcher in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|=)\s*"([^"\\]*)"', expr):
        label, op, value = matcher.groups()
        if op == "=":
            found.values.add((label, value))
        elif re.fullmatch(r"[a-zA-Z0-9_]+(\|[a-zA-Z0-9_]+)*", value):
            found.values |= {(label, alternative) for alternative in value.split("|")}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    for clause in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        found.grouping |= {label.strip() for label in clause.group(1).split(",") if label.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for selector in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", text):
        for matcher in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector[2]):
            found.matchers.add((selector[1], matcher[1]))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for token in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = token.group(1), token.group(2)
        if call or name in _FUNCTIONS_AND_KEYWORDS:
            continue
        found.metrics.add(name)
    return found


def unknown_names(expr: str) -> list[str]:
    """What ``expr`` names that no one exposes: metrics, labels those metrics lack, and
    values those labels never take."""
    known = {**exposed(), **EXPORTER, **BUILTIN}
    found = reads(expr)
    problems = [f"metric {name}" for name in sorted(found.metrics - set(known))]
    for metric, label in sorted(found.matchers):
        if metric in known and label not in {*known[metric], *TARGET_LABELS}:
            problems.append(f"label {label} of {metric}")
    labels = {label for name in found.metrics & set(known) for label in known[name]}
    for label in sorted(found.grouping - labels - TARGET_LABELS):
        problems.append(f"label {label} (by/on) of {', '.join(sorted(found.metrics))}")
    for label, value in sorted(found.values):
        if label in LABEL_VALUES and value not in LABEL_VALUES[label]:
            problems.append(f'value {label}="{value}"')
    return problems
