"""One measurement of one config: apply, wait until ready, load over repeated windows, aggregate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from autotune.load import LoadDriver, LoadResult, LocustDriver
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study._cost import cost_metrics
from autotune.study._progress import NullObserver, Observer
from autotune.study._stats import aggregate
from autotune.targets import ProxyUsage, Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """Everything one trial measured. ``metrics`` holds the aggregated numbers (objectives and
    constraints read from it), ``spread`` each metric's coefficient of variation over the
    windows, ``windows`` the per-window figures, ``timings`` the wall time of each phase."""

    metrics: dict[str, float]
    spread: dict[str, float] = field(default_factory=dict)
    windows: list[dict[str, float]] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)
    observed: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def combine(load: LoadResult, usage: ProxyUsage, config: MeshConfig,
            request_default: float = 0.1) -> dict[str, float]:
    """Client-side load figures and the proxy's CPU over the same window, as flat metrics
    (``request_default``: the spec's ``sidecar.cpuRequest`` in cores)."""
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
        **cost_metrics(config, usage.cpu_cores, load.achieved_rps, request_default),
        **usage.extra,
    }


def default_driver(spec: StudySpec) -> LoadDriver:
    """Locust with the spec's locustfile (the built-in paced one unless ``load.locustfile``)."""
    return LocustDriver(spec.locustfile_path())


def _load_run(target: Target, spec: StudySpec, config: MeshConfig, windows: int,
              obs: Observer, load: LoadDriver) -> tuple[list[dict[str, float]], dict[str, int]]:
    """One load run: a warm-up, then ``windows`` back-to-back windows, each with the proxy's CPU."""
    usage: list[ProxyUsage] = []
    results = load.run(
        target.load_url, spec.load, warmup_s=spec.timing.warmup, window_s=spec.timing.window, windows=windows,
        on_window_start=lambda _i: target.begin_window(),
        on_window_end=lambda _i: usage.append(target.end_window()),
        progress=obs.phase,
        timeout_s=(spec.timing.warmup + windows * (spec.timing.window + target.end_window_wait_s)
                   + spec.timing.load_grace),
    )
    counts: dict[str, int] = {}
    for r in results:
        for code, n in r.status_counts.items():
            counts[code] = counts.get(code, 0) + n
    request = spec.sidecar.cpu_request_cores
    return [combine(r, u, config, request) for r, u in zip(results, usage, strict=True)], counts


def measure_config(target: Target, spec: StudySpec, config: MeshConfig,
                   observer: Observer | None = None, *, repeats: int | None = None,
                   load: LoadDriver | None = None) -> Measurement:
    """Apply ``config`` to a started target and measure it under the spec's load, run by ``load``
    (default: Locust with the spec's locustfile).

    Runs ``spec.measurement.repeats`` windows (or ``repeats``); while the p95's coefficient of
    variation is above ``target_cv`` it adds windows up to ``max_repeats``. Raises ``TrialFailed``
    when the config cannot be applied, never becomes ready, or the load fails. Does not restore
    the target: the caller decides (the study restores after failures).
    """
    obs = observer or NullObserver()
    driver = load or default_driver(spec)
    rules = spec.measurement
    first = repeats if repeats is not None else rules.repeats
    most = repeats if repeats is not None else rules.max_repeats
    t0 = time.monotonic()
    obs.phase("apply", 0.0)
    target.apply(config)
    t1 = time.monotonic()
    obs.phase("ready", 0.0)
    target.wait_ready(spec.timing.ready_timeout)
    if spec.timing.settle:
        time.sleep(spec.timing.settle)
    observed = target.observed().to_dict()
    t2 = time.monotonic()
    windows, counts = _load_run(target, spec, config, first, obs, driver)
    runs = 1
    metrics, spread = aggregate(windows)
    while spread.get("latency_p95_ms", 0.0) > rules.target_cv and len(windows) < most:
        extra = min(most - len(windows), first)
        logger.info("p95 varies by %.0f%% over %d windows; measuring %d more",
                 100 * spread["latency_p95_ms"], len(windows), extra)
        more, more_counts = _load_run(target, spec, config, extra, obs, driver)
        windows += more
        for code, n in more_counts.items():
            counts[code] = counts.get(code, 0) + n
        runs += 1
        metrics, spread = aggregate(windows)
    t3 = time.monotonic()
    metrics["windows"] = float(len(windows))
    timings = {"apply_s": t1 - t0, "ready_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
               "window_s": runs * spec.timing.warmup + len(windows) * spec.timing.window}
    return Measurement(metrics=metrics, spread=spread, windows=windows, status_counts=counts,
                       observed=observed, timings=timings)
