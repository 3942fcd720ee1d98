"""Turn one measurement into the study's objective values and constraint values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from autotune.spec import Constraints, Objective

#: Units shown beside each metric in tables.
METRIC_LABELS: dict[str, str] = {
    "latency_p50_ms": "p50 ms",
    "latency_p95_ms": "p95 ms",
    "latency_p99_ms": "p99 ms",
    "cpu_cores": "CPU cores",
    "cpu_reserved_cores": "CPU limit",
    "cpu_used_cores": "CPU used",
    "cpu_requested_cores": "CPU request",
    "cpu_limit_cores": "CPU limit",
    "cpu_per_1k_rps": "CPU/1k rps",
}
#: Readable metric names, set on the study (``Study.set_metric_names``) for the dashboard's axes.
METRIC_NAMES: dict[str, str] = {
    "latency_p50_ms": "p50 latency (ms)",
    "latency_p95_ms": "p95 latency (ms)",
    "latency_p99_ms": "p99 latency (ms)",
    "cpu_cores": "CPU used (cores)",
    "cpu_reserved_cores": "CPU limit (cores)",
    "cpu_used_cores": "CPU used (cores)",
    "cpu_requested_cores": "CPU request (cores)",
    "cpu_limit_cores": "CPU limit (cores)",
    "cpu_per_1k_rps": "CPU used per 1,000 rps (cores)",
}
CONSTRAINT_NAMES = ("error_rate", "throughput_ratio")


def objective_values(objectives: Sequence[Objective], metrics: Mapping[str, float]) -> list[float]:
    """The values Optuna optimizes, in spec order. Raises ``ValueError`` if one is not a number
    (e.g. no request succeeded, so there is no latency to speak of)."""
    values = []
    for obj in objectives:
        value = float(metrics[obj.metric])
        if not math.isfinite(value):
            raise ValueError(f"{obj.metric} is {value}: no successful request in the window")
        values.append(value)
    return values


def constraint_values(rules: Constraints, metrics: Mapping[str, float]) -> list[float]:
    """Optuna's convention: feasible when every value is <= 0. Order as ``CONSTRAINT_NAMES``."""
    return [
        float(metrics["error_rate"]) - rules.max_error_rate,
        rules.min_throughput_ratio - float(metrics["throughput_ratio"]),
    ]


def violations(rules: Constraints, metrics: Mapping[str, float]) -> list[str]:
    """Human-readable reasons a measurement is infeasible (empty when feasible)."""
    out = []
    if metrics["error_rate"] > rules.max_error_rate:
        out.append(f"error rate {metrics['error_rate']:.1%} > {rules.max_error_rate:.1%}")
    if metrics["throughput_ratio"] < rules.min_throughput_ratio:
        out.append(
            f"throughput {metrics['throughput_ratio']:.0%} of offered < {rules.min_throughput_ratio:.0%}"
        )
    return out
