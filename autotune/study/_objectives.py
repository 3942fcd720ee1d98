"""Turn one measurement into the study's objective values and constraint values.

Metric names: each scenario's metrics are ``<scenario>.<metric>``; an unprefixed name means the
first scenario (a spec without scenarios has one, ``steady``, and its metrics keep the names they
always had). Constraints: one per (scenario, rule), named ``error_rate`` / ``throughput_ratio``
for the first scenario and ``<scenario>.error_rate`` … for the others, plus
``[<scenario>.]cpu_throttled_ratio`` for each scenario whose rules set ``maxThrottledRatio``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from autotune.spec import Constraints, Objective, Scenario

#: Units shown beside each metric in tables (a scenario's metric: ``surge p95 ms``).
METRIC_LABELS: dict[str, str] = {
    "latency_p50_ms": "p50 ms",
    "latency_p95_ms": "p95 ms",
    "latency_p99_ms": "p99 ms",
    "latency_p50_corrected_ms": "p50 ms (CO)",
    "latency_p95_corrected_ms": "p95 ms (CO)",
    "latency_p99_corrected_ms": "p99 ms (CO)",
    "goodput_rps": "goodput rps",
    "goodput_slo_rps": "goodput in SLO rps",
    "error_rate": "errors",
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
    "latency_p50_corrected_ms": "p50 latency, corrected for coordinated omission (ms)",
    "latency_p95_corrected_ms": "p95 latency, corrected for coordinated omission (ms)",
    "latency_p99_corrected_ms": "p99 latency, corrected for coordinated omission (ms)",
    "goodput_rps": "goodput (successful requests/s)",
    "goodput_slo_rps": "goodput within the latency SLO (requests/s)",
    "error_rate": "error rate",
    "cpu_cores": "CPU used (cores)",
    "cpu_reserved_cores": "CPU limit (cores)",
    "cpu_used_cores": "CPU used (cores)",
    "cpu_requested_cores": "CPU request (cores)",
    "cpu_limit_cores": "CPU limit (cores)",
    "cpu_per_1k_rps": "CPU used per 1,000 rps (cores)",
}
#: The rules every scenario is held to, by constraint name.
RULES = ("error_rate", "throughput_ratio")
#: The optional rule (``maxThrottledRatio``), by constraint name: the metric it bounds.
THROTTLE_RULE = "cpu_throttled_ratio"
#: The first scenario's constraint names (a spec without scenarios has only these).
CONSTRAINT_NAMES = RULES


def split(metric: str) -> tuple[str, str]:
    """``(scenario, name)`` of ``[scenario.]name`` (``""`` when unprefixed); scenario names have
    no dots, so the first dot ends the prefix."""
    scenario, dot, name = metric.partition(".")
    return (scenario, name) if dot else ("", metric)


def metric_name(metric: str) -> str:
    """Readable name of ``[scenario.]metric`` (``surge: p95 latency (ms)``)."""
    scenario, name = split(metric)
    text = METRIC_NAMES.get(name, name)
    return f"{scenario}: {text}" if scenario else text


def metric_label(metric: str) -> str:
    """Short column label of ``[scenario.]metric`` (``surge p95 ms``)."""
    scenario, name = split(metric)
    text = METRIC_LABELS.get(name, name)
    return f"{scenario} {text}" if scenario else text


def lookup(metrics: Mapping[str, float], metric: str, first: str | None = None) -> float:
    """The value of ``metric`` in a measurement; ``first`` (the first scenario's name) lets
    ``<first>.name`` and ``name`` stand for each other. NaN when it was not measured."""
    if metric in metrics:
        return float(metrics[metric])
    scenario, name = split(metric)
    if first is not None:
        alias = name if scenario == first else (f"{first}.{metric}" if not scenario else None)
        if alias is not None and alias in metrics:
            return float(metrics[alias])
    return math.nan


def objective_values(objectives: Sequence[Objective], metrics: Mapping[str, float],
                     first: str | None = None) -> list[float]:
    """The values Optuna optimizes, in spec order. Raises ``ValueError`` if one is not a number
    (e.g. no request succeeded, so there is no latency to speak of)."""
    values = []
    for obj in objectives:
        value = lookup(metrics, obj.metric, first)
        if not math.isfinite(value):
            raise ValueError(f"{obj.metric} is {value}: no successful request in the window")
        values.append(value)
    return values


def constraint_name(index: int, scenario: str, rule: str) -> str:
    return rule if index == 0 else f"{scenario}.{rule}"


def rules_of(scenario: Scenario) -> tuple[str, ...]:
    """The constraint rules ``scenario`` is held to: ``RULES``, and ``THROTTLE_RULE`` when its
    ``maxThrottledRatio`` is set. The same for every trial of a spec (Optuna needs that)."""
    return (*RULES, THROTTLE_RULE) if scenario.constraints.max_throttled_ratio is not None else RULES


def constraint_values(scenarios: Sequence[Scenario], metrics: Mapping[str, float]) -> list[tuple[str, float]]:
    """One ``(name, value)`` per (scenario, rule), Optuna's convention: feasible when every value
    is <= 0. A scenario that was not measured (skipped by an early abort) gets 0.0 for each rule:
    neither kept nor broken (the scenario that aborted already makes the trial infeasible); so
    does a target that reports no throttling figure."""
    out = []
    for i, s in enumerate(scenarios):
        rules = s.constraints
        errors = lookup(metrics, f"{s.name}.error_rate", scenarios[0].name)
        ratio = lookup(metrics, f"{s.name}.throughput_ratio", scenarios[0].name)
        values = [errors - rules.max_error_rate, rules.min_throughput_ratio - ratio]
        if rules.max_throttled_ratio is not None:
            values.append(lookup(metrics, f"{s.name}.{THROTTLE_RULE}", scenarios[0].name) - rules.max_throttled_ratio)
        out += [(constraint_name(i, s.name, rule), v if math.isfinite(v) else 0.0)
                for rule, v in zip(rules_of(s), values, strict=True)]
    return out


def violations(scenarios: Sequence[Scenario] | Constraints, metrics: Mapping[str, float]) -> list[str]:
    """Human-readable reasons a measurement is infeasible (empty when feasible), each naming its
    scenario when there are several. ``Constraints`` alone: one scenario, unprefixed metrics."""
    if isinstance(scenarios, Constraints):
        return _broken("", scenarios, float(metrics["error_rate"]), float(metrics["throughput_ratio"]),
                       float(metrics.get(THROTTLE_RULE, math.nan)))
    out = []
    for s in scenarios:
        where = f"{s.name}: " if len(scenarios) > 1 else ""
        errors = lookup(metrics, f"{s.name}.error_rate", scenarios[0].name)
        ratio = lookup(metrics, f"{s.name}.throughput_ratio", scenarios[0].name)
        throttled = lookup(metrics, f"{s.name}.{THROTTLE_RULE}", scenarios[0].name)
        out += _broken(where, s.constraints, errors, ratio, throttled)
    return out


def _broken(where: str, rules: Constraints, errors: float, ratio: float, throttled: float) -> list[str]:
    out = []
    if errors > rules.max_error_rate:
        out.append(f"{where}error rate {errors:.1%} > {rules.max_error_rate:.1%}")
    if ratio < rules.min_throughput_ratio:
        out.append(f"{where}throughput {ratio:.0%} of offered < {rules.min_throughput_ratio:.0%}")
    if rules.max_throttled_ratio is not None and throttled > rules.max_throttled_ratio:
        out.append(f"{where}CPU throttled in {throttled:.0%} of periods > {rules.max_throttled_ratio:.0%}")
    return out
