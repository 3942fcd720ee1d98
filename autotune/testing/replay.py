"""A replayed world for tests and benchmarks: the whole study loop without Envoy or Locust.

A :class:`Landscape` says what each ``MeshConfig`` measures (a :class:`Point`: latencies, error
rate, throughput, the proxy's CPU, the noise, and optionally a failure). A :class:`ReplayTarget`
applies configs instantly and records them; a :class:`ReplayDriver` is a ``LoadDriver`` that
answers each window from the landscape for the config the target has applied, calling the
window callbacks at each window's edges like Locust does. Both share one landscape::

    land = Landscape.synthetic(lambda c: Point(5.0, 8.0, 9.0, cpu_cores=0.1), seed=1)
    run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))

Scenarios: the landscape knows the service faults in force (``ReplayTarget.set_service_faults``)
and each run's load; ``conditions(config, point, load, faults)``, if given, turns the config's
point into what it measures under them (a surge, a failing endpoint).
``autotune.testing.scenario_grid.ScenarioGrid`` builds such a landscape from a recorded CSV.

Noise is deterministic: window ``w`` of the landscape's ``n``-th load run multiplies the three
latencies by ``exp(N(0, noise_cv))`` drawn from ``numpy.random.default_rng([seed, n, w])``, then
(each only when the point's ``spread`` gives it a CV) the throughput ratio, the error rate, the
corrected latencies, the share within the SLO and the CPU by factors drawn the same way.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.load import LoadResult, ProgressFn, StopFn, WindowFn
from autotune.mesh import ISTIO_UNSET_LIMIT, MeshConfig
from autotune.spec import EndpointFault, LoadSpec
from autotune.targets import Observed, ProxyUsage, Target

#: Where each failure of a :class:`Point` is raised, like a real target or load would.
APPLY_FAILURES = frozenset({FailReason.REJECTED, FailReason.API, FailReason.API_TIMEOUT})
READY_FAILURES = frozenset({FailReason.PROXY_START, FailReason.NOT_READY, FailReason.ROLLOUT_FAILED})
#: The CPU quota's period, as a cgroup's cpu.max and the kubelet set it.
_CFS_PERIOD_S = 0.1


@dataclass(frozen=True)
class Spread:
    """How much a point's other figures vary from window to window, as coefficients of variation
    (lognormal noise, like ``Point.noise_cv`` for the raw latencies): the corrected latencies,
    the error rate, the throughput ratio, the proxy's CPU and the share of successful requests
    within the SLO."""

    latency_corrected: float = 0.0
    error_rate: float = 0.0
    throughput_ratio: float = 0.0
    cpu_cores: float = 0.0
    slo_share: float = 0.0


@dataclass(frozen=True)
class Point:
    """What one config measures per window (before noise). ``fail`` makes its measurement fail
    with that reason: at ``apply`` (rejected, api…), ``wait_ready`` (proxy-start, not-ready,
    rollout-failed), in the load run (load), at ``end_window`` (metrics); ``no-success`` answers
    with every request failed; ``interrupted`` raises ``KeyboardInterrupt`` inside the window.

    ``latency_*_corrected_ms``: the latencies free of coordinated omission (NaN: none, as from a
    custom locustfile). ``slo_ms`` and ``slo_share``: the share of successful requests answered
    within ``slo_ms``, so ``LoadResult.goodput_slo_rps(slo_ms)`` gives it back (without
    ``slo_ms`` the goodput within an SLO is interpolated from the percentiles). ``spread``: the
    window-to-window noise of the other figures. ``throttled_ratio``: the share of the window's
    100 ms CPU-quota periods throttled."""

    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    cpu_cores: float
    error_rate: float = 0.0
    throughput_ratio: float = 1.0
    noise_cv: float = 0.0
    fail: FailReason | None = None
    latency_p50_corrected_ms: float = math.nan
    latency_p95_corrected_ms: float = math.nan
    latency_p99_corrected_ms: float = math.nan
    slo_ms: float | None = None
    slo_share: float = 1.0
    spread: Spread = Spread()
    throttled_ratio: float = 0.0


#: A landscape's truth: the point of ``config`` on its ``visit``-th application (0-based), so a
#: config can measure differently in a later round.
PointFn = Callable[[MeshConfig, int], Point]
#: What a config's point becomes under a load and service faults (a scenario).
ConditionFn = Callable[[MeshConfig, Point, LoadSpec, tuple[EndpointFault, ...]], Point]


@dataclass(frozen=True)
class _Window:
    load: LoadResult
    cpu_cores: float
    throttled_ratio: float = 0.0


class Landscape:
    """Per-config metrics, the config currently applied, and the count of load runs.

    ``interrupt_on_run``: the n-th load run (1-based) raises ``KeyboardInterrupt`` inside its
    first window, as Ctrl-C would. :meth:`shift` multiplies every later latency (a drifting
    machine)."""

    def __init__(self, points: PointFn, *, seed: int = 0, interrupt_on_run: int | None = None,
                 conditions: ConditionFn | None = None) -> None:
        self._points = points
        self.conditions = conditions
        self.faults: tuple[EndpointFault, ...] = ()
        #: Every load run: (the config applied, the load, the faults in force, windows run).
        self.runs_log: list[tuple[MeshConfig, LoadSpec, tuple[EndpointFault, ...], int]] = []
        self.seed = seed
        self.interrupt_on_run = interrupt_on_run
        self.latency_factor = 1.0
        self.applied = MeshConfig()
        self.visit = 0
        self.visits: dict[MeshConfig, int] = {}
        self.runs = 0
        self.window: _Window | None = None

    @classmethod
    def synthetic(cls, fn: Callable[[MeshConfig], Point], *, seed: int = 0,
                  interrupt_on_run: int | None = None, conditions: ConditionFn | None = None) -> Landscape:
        """A landscape from a function config → point (the same point on every visit)."""
        return cls(lambda config, _visit: fn(config), seed=seed, interrupt_on_run=interrupt_on_run,
                   conditions=conditions)

    @classmethod
    def from_csv(cls, path: Path | str, *, seed: int = 0, noise: bool = True) -> Landscape:
        """The grid ``bench/record_landscape.py`` recorded (one row per config: the grid columns by
        Istio name, ``latency_p50/p95/p99_ms``, ``cv_latency_p95_ms``, ``cpu_cores``,
        ``error_rate``, ``throughput_ratio``). A config is answered by its nearest grid point (in
        log space for limits and CPU, by value for concurrency); settings left out count at Istio's
        default. A row without a p95 answers ``no-success``. ``noise``: each window's latencies
        vary by the row's recorded coefficient of variation."""
        grid = RecordedGrid.read(path)
        return cls(lambda config, _visit: grid.point(config, noise=noise), seed=seed)

    def point(self, config: MeshConfig, visit: int = 0) -> Point:
        """What ``config`` measures on its ``visit``-th application, noise-free."""
        return self._points(config, visit)

    def current(self, load: LoadSpec | None = None) -> Point:
        """The point of the config in force now (under ``load`` and the faults in force)."""
        point = self.point(self.applied, self.visit)
        if self.conditions is not None and load is not None:
            point = self.conditions(self.applied, point, load, self.faults)
        return point

    def apply(self, config: MeshConfig) -> Point:
        """Put ``config`` in force (counting its visits) and return its point."""
        self.visit = self.visits.get(config, 0)
        self.visits[config] = self.visit + 1
        self.applied = config
        return self.current()

    def restore(self) -> None:
        """The baseline in force again (not counted as a visit), no faults."""
        self.applied, self.visit, self.faults = MeshConfig(), 0, ()

    def shift(self, factor: float) -> None:
        """From now on, every latency is ``factor`` times what the landscape says."""
        self.latency_factor *= factor

    def windows(self, point: Point, load: LoadSpec, window_s: float, count: int, run: int) -> list[_Window]:
        """``count`` noisy windows of ``window_s`` of ``point`` under ``load`` (deterministic per run)."""
        out = []
        for w in range(count):
            noise = _Noise(np.random.default_rng([self.seed, run, w]))
            factor = self.latency_factor * noise.factor(point.noise_cv)
            ratio = min(max(1.0, point.throughput_ratio),
                        point.throughput_ratio * noise.factor(point.spread.throughput_ratio))
            requests = max(1, round(load.offered_rps * window_s * ratio))
            error_rate = min(1.0, point.error_rate * noise.factor(point.spread.error_rate))
            failures = (requests if point.fail == FailReason.NO_SUCCESS
                        else min(requests, round(requests * error_rate)))
            ok = failures < requests
            p50, p95, p99 = ((point.latency_p50_ms * factor, point.latency_p95_ms * factor,
                              point.latency_p99_ms * factor) if ok else (math.nan,) * 3)
            corrected = self.latency_factor * noise.factor(point.spread.latency_corrected)
            c50, c95, c99 = ((point.latency_p50_corrected_ms * corrected, point.latency_p95_corrected_ms * corrected,
                              point.latency_p99_corrected_ms * corrected) if ok else (math.nan,) * 3)
            share = min(1.0, point.slo_share * noise.factor(point.spread.slo_share))
            counts = {k: v for k, v in (("200", requests - failures), ("503", failures)) if v}
            out.append(_Window(LoadResult(
                offered_rps=load.offered_rps, achieved_rps=requests / window_s,
                requests=requests, failures=failures, window_s=window_s,
                latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99, status_counts=counts,
                latency_p50_corrected_ms=c50, latency_p95_corrected_ms=c95, latency_p99_corrected_ms=c99,
                ok_latencies_ms=_within_slo(requests - failures, share, point.slo_ms, p50),
            ), point.cpu_cores * noise.factor(point.spread.cpu_cores), point.throttled_ratio))
        return out


class _Noise:
    """Lognormal factors drawn in a fixed order from one window's generator (a zero CV draws
    nothing, so a point without spread keeps the sequence of the others)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def factor(self, cv: float) -> float:
        return float(np.exp(self.rng.normal(0.0, cv))) if cv > 0 else 1.0


def _within_slo(ok: int, share: float, slo_ms: float | None, p50: float) -> tuple[float, ...]:
    """Sorted stand-in latencies of ``ok`` successful requests, ``share`` of them within
    ``slo_ms`` (the rest at twice the SLO), so ``goodput_slo_rps(slo_ms)`` is exact; ``()`` without
    an SLO."""
    if slo_ms is None or ok <= 0:
        return ()
    within = max(0, min(ok, round(ok * share)))
    inside = min(p50, slo_ms) if math.isfinite(p50) else slo_ms
    return (inside,) * within + (2.0 * slo_ms,) * (ok - within)


class ReplayDriver:
    """A ``LoadDriver`` answering from a landscape for the config applied there (no process, no
    waiting). ``active`` is True only while a run is going on."""

    def __init__(self, landscape: Landscape) -> None:
        self.landscape = landscape
        self.active = False
        self.urls: list[str] = []

    def run(self, url: str, load: LoadSpec, *, warmup_s: float, window_s: float, windows: int,
            on_window_start: WindowFn, on_window_end: WindowFn, progress: ProgressFn | None = None,
            timeout_s: float | None = None, stop_after: StopFn | None = None) -> list[LoadResult]:
        """See ``LoadDriver``: warm-up, then per window ``on_window_start(i)``, the window,
        ``on_window_end(i)`` and ``stop_after(i, result)``; the target's ``end_window`` reads
        that window's CPU. Each run is logged in ``landscape.runs_log``."""
        if windows < 1:
            raise ValueError(f"windows must be >= 1, got {windows}")
        land = self.landscape
        land.runs += 1
        run = land.runs
        self.urls.append(url)
        self.active = True
        report = progress or (lambda _phase, _fraction: None)
        try:
            report("warmup", 0.0)
            point = land.current(load)
            if point.fail == FailReason.LOAD:
                raise TrialFailed(FailReason.LOAD, f"replayed load failure for {land.applied.describe()}")
            report("warmup", 1.0)
            results = []
            for i, window in enumerate(land.windows(point, load, window_s, windows, run)):
                phase = "measure" if windows == 1 else f"measure {i + 1}/{windows}"
                land.window = window
                on_window_start(i)
                report(phase, 0.0)
                if run == land.interrupt_on_run or point.fail == FailReason.INTERRUPTED:
                    raise KeyboardInterrupt(f"replayed Ctrl-C in load run {run}")
                report(phase, 1.0)
                on_window_end(i)
                results.append(window.load)
                if stop_after is not None and stop_after(i, window.load):
                    break
            land.runs_log.append((land.applied, load, land.faults, len(results)))
            return results
        finally:
            land.window = None
            self.active = False


class ReplayTarget(Target):
    """A target that applies instantly and records everything it was asked to do.

    ``applied`` lists every config applied, in order; ``end_window`` returns the landscape's CPU
    for the config in force (that window's, during a replayed load run). Follows the target
    contract: ``TargetError`` before ``start`` or after ``close``, and from ``end_window``
    without an open window; ``restore`` and ``close`` are idempotent."""

    name = "replay"

    def __init__(self, landscape: Landscape) -> None:
        self.landscape = landscape
        self.applied: list[MeshConfig] = []
        self.started = False
        self.closed = False
        self.restores = 0
        self.windows = 0
        self.fault_calls: list[tuple[EndpointFault, ...]] = []
        self._window_start: float | None = None

    def start(self) -> None:
        if self.closed:
            raise TargetError("the replay target is closed")
        self.started = True
        self.landscape.restore()

    def _check(self) -> None:
        if not self.started or self.closed:
            raise TargetError("the replay target is not started")

    def apply(self, config: MeshConfig) -> None:
        self._check()
        self.applied.append(config)
        point = self.landscape.apply(config)
        if point.fail in APPLY_FAILURES:
            raise TrialFailed(point.fail, f"replayed refusal of {config.describe()}")

    def wait_ready(self, timeout_s: float) -> None:
        self._check()
        fail = self.landscape.current().fail
        if fail in READY_FAILURES:
            raise TrialFailed(fail, f"replayed: {self.landscape.applied.describe()} never became ready")

    @property
    def load_url(self) -> str:
        return "http://127.0.0.1:9/replay"

    def begin_window(self) -> None:
        self._check()
        self._window_start = time.monotonic()

    def end_window(self) -> ProxyUsage:
        self._check()
        if self._window_start is None:
            raise TargetError("end_window without begin_window")
        elapsed, self._window_start = time.monotonic() - self._window_start, None
        self.windows += 1
        land = self.landscape
        if land.current().fail == FailReason.METRICS:
            raise TrialFailed(FailReason.METRICS, "replayed: no metrics for the window")
        window = land.window
        cores, ratio, window_s = ((window.cpu_cores, window.throttled_ratio, window.load.window_s)
                                  if window is not None else
                                  (land.current().cpu_cores, land.current().throttled_ratio, elapsed))
        periods = max(1, round(window_s / _CFS_PERIOD_S))
        return ProxyUsage(cpu_cores=cores, window_s=window_s, periods=periods,
                          throttled_periods=round(periods * ratio), throttled_s=0.0)

    supports_service_faults = True

    def set_service_faults(self, faults: Sequence[EndpointFault]) -> None:
        """Put ``faults`` in force in the landscape (``()`` clears them); each call is logged in
        ``fault_calls``."""
        self._check()
        self.fault_calls.append(tuple(faults))
        self.landscape.faults = tuple(faults)

    def observed(self) -> Observed:
        """The replayed proxy runs exactly what was applied."""
        self._check()
        return Observed.expected(self.landscape.applied)

    @property
    def window_open(self) -> bool:
        return self._window_start is not None

    def restore(self) -> None:
        if not self.started or self.closed:
            return
        self.restores += 1
        self._window_start = None
        self.landscape.restore()

    def close(self) -> None:
        if self.closed:
            return
        self.restore()
        self.closed = True


# -- the recorded grid ------------------------------------------------------------------------------

#: Grid columns of ``bench/landscape.csv``, by Istio name.
GRID_COLUMNS = ("proxy.cpuLimit", "proxy.concurrency", "connectionPool.tcp.maxConnections",
                "connectionPool.http.http1MaxPendingRequests")
_LINEAR = frozenset({"proxy.concurrency"})


class RecordedGrid:
    """The rows of a recorded landscape CSV, looked up by nearest grid point."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        if not rows:
            raise ValueError("the landscape has no rows")
        missing = [c for c in GRID_COLUMNS if c not in rows[0]]
        if missing:
            raise ValueError(f"the landscape lacks the grid columns {missing}")
        self.values = {c: sorted({float(r[c]) for r in rows}) for c in GRID_COLUMNS}
        self.rows = {self.key({c: float(r[c]) for c in GRID_COLUMNS}): r for r in rows}

    @classmethod
    def read(cls, path: Path | str) -> RecordedGrid:
        with open(path, newline="", encoding="utf-8") as f:
            return cls(list(csv.DictReader(f)))

    @staticmethod
    def key(params: dict[str, float]) -> tuple[float, ...]:
        return tuple(round(float(params[c]), 6) for c in GRID_COLUMNS)

    def snap(self, config: MeshConfig) -> dict[str, float]:
        """The nearest grid point; settings left out count at Istio's default (limits unset)."""
        params = config.to_params()
        wanted = {"proxy.cpuLimit": config.effective_cpu_limit,
                  "proxy.concurrency": float(config.effective_concurrency)}
        out: dict[str, float] = {}
        for c in GRID_COLUMNS:
            vals = self.values[c]
            raw = params.get(c)  # a string is a CPU limit left unset: its effective value counts
            v = float(raw) if isinstance(raw, int | float) else float(wanted.get(c, ISTIO_UNSET_LIMIT))
            if c in _LINEAR:
                out[c] = min(vals, key=lambda g: (abs(g - v), g))
            else:
                out[c] = min(vals, key=lambda g: (abs(math.log(g) - math.log(v)), g))
        return out

    def row(self, config: MeshConfig) -> dict[str, str]:
        return self.rows[self.key(self.snap(config))]

    def point(self, config: MeshConfig, *, noise: bool = True) -> Point:
        row = self.row(config)
        p95 = _float(row.get("latency_p95_ms"))
        point = Point(
            latency_p50_ms=_float(row.get("latency_p50_ms")), latency_p95_ms=p95,
            latency_p99_ms=_float(row.get("latency_p99_ms")),
            cpu_cores=_float(row.get("cpu_cores"), 0.0),
            error_rate=_float(row.get("error_rate"), 1.0),
            throughput_ratio=_float(row.get("throughput_ratio"), 0.0),
            noise_cv=_float(row.get("cv_latency_p95_ms"), 0.0) if noise else 0.0,
        )
        return point if math.isfinite(p95) else replace(point, fail=FailReason.NO_SUCCESS)


def _float(raw: str | None, default: float = math.nan) -> float:
    try:
        value = float(raw) if raw not in (None, "") else default
    except ValueError:
        return default
    return value if math.isfinite(value) else default


__all__ = [
    "APPLY_FAILURES",
    "GRID_COLUMNS",
    "READY_FAILURES",
    "ConditionFn",
    "Landscape",
    "Point",
    "PointFn",
    "RecordedGrid",
    "ReplayDriver",
    "ReplayTarget",
    "Spread",
]
