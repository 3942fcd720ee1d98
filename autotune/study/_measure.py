"""One measurement of one config: apply, wait until ready, load over repeated windows, aggregate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from autotune.load import LoadDriver, LoadResult, LocustDriver
from autotune.mesh import MeshConfig
from autotune.spec import Constraints, Scenario, StudySpec
from autotune.study._cost import cost_metrics
from autotune.study._progress import NullObserver, Observer
from autotune.study._stats import aggregate
from autotune.targets import ProxyUsage, Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Abort:
    """Where a trial stopped early (``measurement.earlyAbort``): the scenario and the window
    (1-based) whose figures broke a constraint, what was skipped and the planned time saved."""

    scenario: str
    window: int
    skipped_windows: int
    skipped_scenarios: list[str]
    saved_s: float

    def to_dict(self) -> dict[str, object]:
        return {"scenario": self.scenario, "window": self.window, "skipped_windows": self.skipped_windows,
                "skipped_scenarios": list(self.skipped_scenarios), "saved_s": round(self.saved_s, 3)}


@dataclass(frozen=True)
class Measurement:
    """Everything one trial measured. ``metrics`` holds the aggregated numbers of every scenario
    run, named ``<scenario>.<metric>``, and the first scenario's also unprefixed (what a spec
    without scenarios always had); objectives and constraints read from it. ``spread`` is each
    metric's coefficient of variation over the windows (named alike), ``windows`` the first
    scenario's per-window figures, ``timings`` the wall time of each phase; ``aborted`` says
    where an early abort stopped the trial (skipped scenarios have no metrics)."""

    metrics: dict[str, float]
    spread: dict[str, float] = field(default_factory=dict)
    windows: list[dict[str, float]] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)
    observed: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    aborted: Abort | None = None


def combine(load: LoadResult, usage: ProxyUsage, config: MeshConfig,
            request_default: float = 0.1, slo_ms: float | None = None) -> dict[str, float]:
    """Client-side load figures and the proxy's CPU over the same window, as flat metrics
    (``request_default``: the spec's ``sidecar.cpuRequest`` in cores; ``goodput_slo_rps`` only
    with a latency SLO ``slo_ms``)."""
    out = {
        "latency_p50_ms": load.latency_p50_ms,
        "latency_p95_ms": load.latency_p95_ms,
        "latency_p99_ms": load.latency_p99_ms,
        "latency_p50_corrected_ms": load.latency_p50_corrected_ms,
        "latency_p95_corrected_ms": load.latency_p95_corrected_ms,
        "latency_p99_corrected_ms": load.latency_p99_corrected_ms,
        "achieved_rps": load.achieved_rps,
        "goodput_rps": load.goodput_rps,
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
    if slo_ms is not None:
        out["goodput_slo_rps"] = load.goodput_slo_rps(slo_ms)
    return out


def default_driver(spec: StudySpec) -> LoadDriver:
    """Locust with the spec's locustfile (the built-in paced one unless ``load.locustfile``)."""
    return LocustDriver(spec.locustfile_path())


def breaks(rules: Constraints, load: LoadResult, usage: ProxyUsage | None = None) -> bool:
    """Whether one window's figures break a constraint (what an early abort looks at): its error
    rate, its throughput ratio and, when the rules bound it and the window's CPU was read, the
    share of CPU-quota periods throttled."""
    throttled = (rules.max_throttled_ratio is not None and usage is not None
                 and usage.throttled_ratio > rules.max_throttled_ratio)
    return throttled or load.error_rate > rules.max_error_rate or load.throughput_ratio < rules.min_throughput_ratio


@dataclass
class _Run:
    """One scenario's windows so far."""

    windows: list[dict[str, float]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    broke: bool = False


def _load_run(target: Target, spec: StudySpec, scenario: Scenario, config: MeshConfig, windows: int,
              obs: Observer, load: LoadDriver, run: _Run, *, abort: bool) -> None:
    """One load run of ``scenario``: a warm-up, then ``windows`` back-to-back windows, each with
    the proxy's CPU, added to ``run``. With ``abort``, a first window that breaks a constraint
    ends the run (``run.broke``)."""
    usage: list[ProxyUsage] = []

    def stop_after(i: int, result: LoadResult) -> bool:
        run.broke = abort and i == 0 and breaks(scenario.constraints, result, usage[-1] if usage else None)
        return run.broke

    results = load.run(
        target.load_url, scenario.load, warmup_s=scenario.warmup, window_s=scenario.window, windows=windows,
        on_window_start=lambda _i: target.begin_window(),
        on_window_end=lambda _i: usage.append(target.end_window()),
        progress=obs.phase,
        timeout_s=(scenario.warmup + windows * (scenario.window + target.end_window_wait_s)
                   + spec.timing.load_grace),
        stop_after=stop_after if abort else None,
    )
    run.runs += 1
    for r in results:
        for code, n in r.status_counts.items():
            run.counts[code] = run.counts.get(code, 0) + n
    request = spec.sidecar.cpu_request_cores
    run.windows += [combine(r, u, config, request, scenario.slo_ms) for r, u in zip(results, usage, strict=True)]


def _measure_scenario(target: Target, spec: StudySpec, scenario: Scenario, config: MeshConfig,
                      obs: Observer, load: LoadDriver, repeats: int | None, abort: bool) -> _Run:
    """The scenario's windows: its own count, or the noise control's (``repeats`` … ``maxRepeats``
    while the p95 varies by more than ``targetCv``), with its service faults in force."""
    rules = spec.measurement
    fixed = repeats if repeats is not None else scenario.windows
    first = fixed if fixed is not None else rules.repeats
    most = fixed if fixed is not None else rules.max_repeats
    run = _Run()
    try:
        if scenario.faults:
            target.set_service_faults(scenario.faults)
        _load_run(target, spec, scenario, config, first, obs, load, run, abort=abort)
        spread = aggregate(run.windows)[1]
        while not run.broke and spread.get("latency_p95_ms", 0.0) > rules.target_cv and len(run.windows) < most:
            extra = min(most - len(run.windows), first)
            logger.info("%s: p95 varies by %.0f%% over %d windows; measuring %d more", scenario.name,
                        100 * spread["latency_p95_ms"], len(run.windows), extra)
            _load_run(target, spec, scenario, config, extra, obs, load, run, abort=False)
            spread = aggregate(run.windows)[1]
    finally:
        if scenario.faults:
            target.set_service_faults(())
    return run


def _planned_windows(spec: StudySpec, scenario: Scenario, repeats: int | None) -> int:
    """The windows a scenario runs at least (the noise control may add more)."""
    return repeats or scenario.windows or spec.measurement.repeats


def _planned_s(spec: StudySpec, scenario: Scenario, repeats: int | None) -> float:
    return scenario.warmup + _planned_windows(spec, scenario, repeats) * scenario.window


def measure_config(target: Target, spec: StudySpec, config: MeshConfig,
                   observer: Observer | None = None, *, repeats: int | None = None,
                   load: LoadDriver | None = None, early_abort: bool | None = None) -> Measurement:
    """Apply ``config`` to a started target and measure it under every scenario of the spec, in
    order, run by ``load`` (default: Locust with the spec's locustfile).

    Each scenario runs its windows (``repeats`` overrides every scenario's count and turns the
    noise control off) with its service faults in force (cleared after it). With
    ``early_abort`` (default: ``measurement.earlyAbort``), a scenario whose first window breaks
    one of its constraints ends the measurement there (``Measurement.aborted``). Raises
    ``TrialFailed`` when the config cannot be applied, never becomes ready, or the load fails.
    Does not restore the target: the caller decides (the study restores after failures).
    """
    obs = observer or NullObserver()
    driver = load or default_driver(spec)
    abort = spec.measurement.early_abort if early_abort is None else early_abort
    scenarios = spec.scenario_list()
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
    metrics: dict[str, float] = {}
    spread: dict[str, float] = {}
    counts: dict[str, int] = {}
    first_windows: list[dict[str, float]] = []
    windows = runs = 0
    planned = run_s = 0.0
    aborted: Abort | None = None
    for index, scenario in enumerate(scenarios):
        run = _measure_scenario(target, spec, scenario, config, obs, driver, repeats, abort)
        m, sp = aggregate(run.windows)
        metrics.update({f"{scenario.name}.{k}": v for k, v in m.items()})
        spread.update({f"{scenario.name}.{k}": v for k, v in sp.items()})
        if index == 0:
            metrics.update(m)
            spread.update(sp)
            first_windows = run.windows
        for code, n in run.counts.items():
            counts[code] = counts.get(code, 0) + n
        windows += len(run.windows)
        runs += run.runs
        run_s += run.runs * scenario.warmup + len(run.windows) * scenario.window
        planned += _planned_s(spec, scenario, repeats)
        skipped = _planned_windows(spec, scenario, repeats) - len(run.windows)
        rest = scenarios[index + 1:]
        if run.broke and (skipped or rest):
            planned += sum(_planned_s(spec, s, repeats) for s in rest)
            aborted = Abort(scenario=scenario.name, window=1, skipped_windows=skipped,
                            skipped_scenarios=[s.name for s in rest], saved_s=planned - run_s)
            also = f" and scenario(s) {', '.join(aborted.skipped_scenarios)}" if rest else ""
            logger.info("%s broke a constraint in the first window of %s: skipping %d window(s)%s, "
                        "saving %.0f s of load", config.describe(), scenario.name, skipped, also,
                        aborted.saved_s)
            break
    t3 = time.monotonic()
    metrics["windows"] = float(windows)
    timings = {"apply_s": t1 - t0, "ready_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
               "window_s": run_s}
    if aborted is not None:
        timings["saved_s"] = aborted.saved_s
    return Measurement(metrics=metrics, spread=spread, windows=first_windows, status_counts=counts,
                       observed=observed, timings=timings, aborted=aborted)
