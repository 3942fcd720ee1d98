"""One measurement of one config: apply, wait until ready, load, measure."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from autotune.load import LoadResult, run_load
from autotune.params import MeshConfig
from autotune.progress import NullObserver, Observer
from autotune.spec import StudySpec
from autotune.targets import ProxyUsage, Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """Everything one trial measured. ``metrics`` holds flat numbers (objectives and constraints
    read from it); ``timings`` the wall time of each phase in seconds."""

    metrics: dict[str, float]
    status_counts: dict[str, int] = field(default_factory=dict)
    observed: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def combine(load: LoadResult, usage: ProxyUsage, config: MeshConfig) -> dict[str, float]:
    """Client-side load figures and the proxy's CPU over the same window, as flat metrics."""
    return {
        "latency_p50_ms": load.latency_p50_ms,
        "latency_p95_ms": load.latency_p95_ms,
        "latency_p99_ms": load.latency_p99_ms,
        "achieved_rps": load.achieved_rps,
        "offered_rps": load.offered_rps,
        "throughput_ratio": load.throughput_ratio,
        "error_rate": load.error_rate,
        "requests": float(load.requests),
        "failures": float(load.failures),
        "window_s": load.window_s,
        "cpu_cores": usage.cpu_cores,
        "cpu_reserved_cores": config.effective_cpu_limit,
        "cpu_throttled_ratio": usage.throttled_ratio,
        "cpu_throttled_s": usage.throttled_s,
    }


def measure_config(target: Target, spec: StudySpec, config: MeshConfig,
                   observer: Observer | None = None) -> Measurement:
    """Apply ``config`` to a started target and measure it under the spec's load.

    Raises ``TrialFailed`` when the config cannot be applied, never becomes ready, or the load
    fails. Does not restore the target: the caller decides (the study restores after failures).
    """
    obs = observer or NullObserver()
    t0 = time.monotonic()
    obs.phase("apply", 0.0)
    target.apply(config)
    t1 = time.monotonic()
    obs.phase("ready", 0.0)
    target.wait_ready(spec.timing.ready_timeout)
    if spec.timing.settle:
        time.sleep(spec.timing.settle)
    observed = target.observed_config()
    t2 = time.monotonic()
    usage: list[ProxyUsage] = []
    load = run_load(
        target.load_url, spec.load, spec.locustfile_path(),
        on_window_start=target.begin_window,
        on_window_end=lambda: usage.append(target.end_window()),
        progress=obs.phase,
        timeout_s=spec.load.warmup + spec.load.duration + spec.timing.load_grace,
    )
    t3 = time.monotonic()
    timings = {"apply_s": t1 - t0, "ready_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
               "window_s": spec.load.warmup + spec.load.duration}
    return Measurement(metrics=combine(load, usage[0], config), status_counts=load.status_counts,
                       observed=observed, timings=timings)
