"""Noise control arithmetic: repeated windows aggregated robustly, paired confidence intervals."""

from __future__ import annotations

import math

import pytest

from autotune.study import aggregate, cv, paired_change


def test_aggregate_takes_medians_and_is_conservative_on_load_validity() -> None:
    windows = [
        {"latency_p95_ms": 10.0, "cpu_cores": 0.10, "requests": 100.0, "failures": 0.0,
         "throughput_ratio": 1.0, "error_rate": 0.0, "window_s": 10.0},
        {"latency_p95_ms": 50.0, "cpu_cores": 0.11, "requests": 100.0, "failures": 4.0,
         "throughput_ratio": 0.80, "error_rate": 0.04, "window_s": 10.0},  # an outlier window
        {"latency_p95_ms": 11.0, "cpu_cores": 0.12, "requests": 100.0, "failures": 0.0,
         "throughput_ratio": 0.99, "error_rate": 0.0, "window_s": 10.0},
    ]
    agg, spread = aggregate(windows)
    assert agg["latency_p95_ms"] == 11.0  # the median shrugs off the outlier
    assert agg["cpu_cores"] == pytest.approx(0.11)
    assert agg["requests"] == 300 and agg["window_s"] == 30
    assert agg["error_rate"] == pytest.approx(4 / 300)
    assert agg["throughput_ratio"] == 0.80  # the worst window counts
    assert spread["latency_p95_ms"] == pytest.approx(cv([10.0, 50.0, 11.0]))
    assert spread["latency_p95_ms"] > 0.5


def test_cv_edge_cases() -> None:
    assert cv([5.0]) == 0.0 and cv([]) == 0.0 and cv([0.0, 0.0]) == 0.0
    assert cv([9.0, 11.0]) == pytest.approx(math.sqrt(2) / 10)


def test_paired_change_detects_a_real_gain_and_not_a_null_one() -> None:
    base = [10.0, 12.0, 11.0, 10.5]  # the machine drifts; pairing cancels it
    better = [8.0, 9.7, 8.8, 8.4]  # ~20 % lower each round
    change = paired_change(base, better, 0.9)
    assert change.mean_pct == pytest.approx(-19.6, abs=0.5) and change.improves("minimize")
    same = [10.3, 11.6, 11.2, 10.4]  # no real difference
    null = paired_change(base, same, 0.9)
    assert not null.improves("minimize") and not null.improves("maximize")
    assert null.low_pct < 0 < null.high_pct


def test_paired_change_degenerate_cases() -> None:
    point = paired_change([2.0, 2.0, 2.0], [0.5, 0.5, 0.5], 0.9)  # a CPU limit: no noise
    assert point.low_pct == point.high_pct == -75.0 and point.improves("minimize")
    one = paired_change([10.0], [5.0], 0.9)
    assert one.low_pct == -math.inf and not one.improves("minimize")
    with pytest.raises(ValueError):
        paired_change([1.0], [1.0, 2.0], 0.9)


def test_proxy_event_counters_are_summed_over_windows_not_medianed() -> None:
    """A burst of 503 overflows in one window must show in the trial's total."""
    windows = [{"latency_p95_ms": 5.0, "envoy_pending_overflow": 0.0, "requests": 10.0, "failures": 0.0},
               {"latency_p95_ms": 6.0, "envoy_pending_overflow": 40.0, "requests": 10.0, "failures": 4.0},
               {"latency_p95_ms": 7.0, "envoy_pending_overflow": 0.0, "requests": 10.0, "failures": 0.0}]
    metrics, _ = aggregate(windows)
    assert metrics["envoy_pending_overflow"] == 40.0
    assert metrics["latency_p95_ms"] == 6.0


def test_paired_change_against_a_baseline_that_measured_nothing() -> None:
    """Under a surge the default's goodput within the SLO is 0: the change exists (no division by
    zero) and a consistent rise from nothing is an improvement; 0 against 0 is no change."""
    rise = paired_change([0.0, 0.0, 0.0], [300.0, 310.0, 290.0], 0.9)
    assert rise.mean_pct == pytest.approx(100.0) and rise.low_pct > 0 and rise.improves("maximize")
    mixed = paired_change([0.0, 2.0, 0.0], [300.0, 310.0, 290.0], 0.9)  # % of the baseline's mean
    assert mixed.mean_pct == pytest.approx((300 + 308 + 290) / 3 / (2 / 3) * 100)
    none = paired_change([0.0, 0.0], [0.0, 0.0], 0.9)
    assert (none.mean_pct, none.low_pct, none.high_pct) == (0.0, 0.0, 0.0)
    assert not none.improves("minimize")
