"""Which knob matters where: each tunable setting swept alone from Istio's default, on every scenario.

    python bench/knobs.py [--spec search-spaces/local-scenarios.yaml] [--knobs K1,K2] [--scenarios S1,S2]
                          [--warmup 1] [--window 2] [--windows 2] [--out bench/knobs.csv] [--fresh] [--no-write]

On the local target (a real Envoy, the spec's finite-capacity endpoints), for each knob of
``mesh.PARAMETERS`` the local target applies, two values away from Istio's default (``KNOBS``: a
tight and a loose one, chosen so that an effect is plausible) are measured, each alone on top of
Istio's default, with ``study.measure_config`` under every scenario of the spec (its load, faults
and SLO; ``--warmup`` s of warm-up and ``--windows`` windows of ``--window`` s each, no noise
control, no early abort). Istio's default is measured again before each knob's pair, so each
scenario gets as many default measurements as there are knobs: its min–max is the noise interval.

A knob value *matters* on a scenario when one of its metrics (CO-corrected p95 and p99,
goodput within the SLO, error rate, CPU used) lies outside the default's min–max on that
scenario and differs from the default's median by more than its ``THRESHOLD`` (relative; the
error rate's is absolute). The table shows, per knob and scenario, the largest such effect
and its direction; the detail rows (every metric and Envoy counter per value and scenario) go to
the CSV, the table to bench/RESULTS.md.

Each knob's group (default, tight, loose) runs under ``/tmp/autotune-load.lock`` (``--knobs-per-lock``
groups per hold) and is appended to the CSV when it completes, so other load tests can run between
holds and an interrupted run resumes where it stopped (``--fresh`` starts a new CSV).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _results import write_section
from autotune.errors import TrialFailed
from autotune.mesh import PARAMETERS, MeshConfig, ParamValue, cluster_name, envoy_cluster, envoy_route
from autotune.spec import LocalTargetSpec, StudySpec, load_spec, parse_spec
from autotune.study import measure_config
from autotune.targets.local import LocalTarget

LOCK = Path("/tmp/autotune-load.lock")


@dataclass(frozen=True)
class Knob:
    """A setting and the two values measured against Istio's default, with why they could matter."""

    name: str
    tight: ParamValue
    loose: ParamValue
    why: str


#: The knobs swept, in run order, each with a tight and a loose value away from Istio's default.
KNOBS: tuple[Knob, ...] = (
    Knob("connectionPool.tcp.maxConnections", 8, 64,
         "8 = the service's workers: excess requests wait in Envoy, not at the endpoints (default: unlimited)"),
    Knob("connectionPool.http.http1MaxPendingRequests", 1, 64,
         "a short pending queue sheds load with 503 overflows"),
    Knob("connectionPool.http.http2MaxRequests", 8, 64,
         "caps requests in flight (8 = the service's workers): sheds a surge as fast 503s"),
    Knob("connectionPool.http.maxRequestsPerConnection", 1, 100,
         "1 = a new upstream connection per request (no keep-alive)"),
    Knob("connectionPool.http.maxRetries", 1, 64, "caps retries in flight (default: unlimited)"),
    Knob("connectionPool.http.idleTimeout", 20, 2000, "idle connections closed and reopened (default 1h)"),
    Knob("connectionPool.tcp.connectTimeout", 1, 100, "a 1 ms connect can time out under load (default 10s)"),
    Knob("outlierDetection.consecutive5xxErrors", 1, 10, "ejects the failing endpoint (block off by default)"),
    Knob("outlierDetection.consecutiveGatewayErrors", 1, 10, "503s are gateway errors: ejects the failing endpoint"),
    Knob("outlierDetection.interval", 500, 30000, "turns outlier detection on (5 consecutive 5xx); sweep period"),
    Knob("outlierDetection.baseEjectionTime", 1000, 300000, "turns outlier detection on; how long an ejection lasts"),
    Knob("outlierDetection.maxEjectionPercent", 25, 100,
         "turns outlier detection on; at Envoy's 10 % no host of 4 may be ejected, at 25 % one"),
    Knob("loadBalancer.simple", "ROUND_ROBIN", "RANDOM", "ignores endpoint load (default LEAST_REQUEST)"),
    Knob("retries.attempts", 0, 5, "retries of connect failures and resets (default 2)"),
    Knob("retries.perTryTimeout", 50, 250, "a per-try timeout turns slow answers into 504s (default none)"),
    Knob("proxy.concurrency", 1, 4, "Envoy workers (default 2: ceil of the 2000m limit)"),
    Knob("proxy.cpuLimit", 0.1, "unset",
         "a 100m quota throttles; unset = no quota, which on a 2-core machine is the default's 2 cores "
         "and 2 workers (an A/A control)"),
)
#: Tunable settings not swept, and why they have no effect on the local target by construction.
SKIPPED: dict[str, str] = {
    "proxy.cpuRequest": "only the sidecar.istio.io/proxyCPU annotation: locally no scheduler, no "
                        "cgroup weight and no effect on workers (Istio 1.30 derives concurrency from the "
                        "limit); it changes only the cpu_requested_cores cost figure",
}

#: The metrics a "matters" verdict looks at, with whether larger is better.
DECISION: dict[str, bool] = {
    "latency_p95_corrected_ms": False,
    "latency_p99_corrected_ms": False,
    "goodput_slo_rps": True,
    "error_rate": False,
    "cpu_used_cores": False,
}
#: How far from the default's median a metric must be (besides leaving its min–max) to matter:
#: relative to it, except the error rate's (absolute) and goodput's (a share of the offered rate,
#: since the default's goodput within the SLO is 0 under a surge).
THRESHOLD: dict[str, float] = {
    "latency_p95_corrected_ms": 0.20,
    "latency_p99_corrected_ms": 0.20,
    "goodput_slo_rps": 0.05,
    "error_rate": 0.03,  # ~2 sd of a 15 % error rate over ~800 requests (binomial: 1.3 pp)
    "cpu_used_cores": 0.20,
}
SHORT = {"latency_p95_corrected_ms": "p95", "latency_p99_corrected_ms": "p99", "goodput_slo_rps": "goodput",
         "error_rate": "errors", "cpu_used_cores": "CPU"}
#: Envoy counters reported (per second of measured window), by metric name.
COUNTERS = ("envoy_upstream_rq", "envoy_upstream_cx", "envoy_pending_overflow", "envoy_cx_overflow",
            "envoy_upstream_503", "envoy_upstream_resets", "envoy_retries", "envoy_retry_overflow",
            "envoy_ejections", "envoy_ejections_overflow", "envoy_timeouts", "envoy_per_try_timeouts",
            "envoy_connect_timeouts", "envoy_connect_failures")
METRICS = ("latency_p50_corrected_ms", "latency_p95_corrected_ms", "latency_p99_corrected_ms",
           "latency_p95_ms", "latency_p99_ms", "goodput_rps", "goodput_slo_rps", "achieved_rps",
           "offered_rps", "error_rate", "cpu_used_cores", "cpu_throttled_ratio")
COLUMNS = ["group", "knob", "role", "value", "scenario", *METRICS, *(f"{c}_per_s" for c in COUNTERS),
           "applied", "failed", "warmup_s", "window_s", "windows", "wall_s", "measured_at"]
#: Seconds per scenario a measurement spends besides its load (Locust start and stop) and per config (apply).
SCENARIO_OVERHEAD_S = 2.0
APPLY_OVERHEAD_S = 1.5


def check_classified() -> None:
    """Every tunable setting is either swept or skipped with a reason (a new one must be added)."""
    swept = {k.name for k in KNOBS}
    missing = set(PARAMETERS) - swept - set(SKIPPED)
    if missing:
        raise SystemExit(f"bench/knobs.py: classify {sorted(missing)} in KNOBS or SKIPPED")


def bench_spec(spec: StudySpec, scenarios: list[str] | None, warmup: float, window: float,
               windows: int) -> StudySpec:
    """The spec with only ``scenarios`` (default: all), each with the bench's warm-up and windows."""
    data = spec.model_dump(by_alias=False, exclude={"source"})
    listed = data.get("scenarios") or [{"name": "steady"}]
    names = [s["name"] for s in listed]
    wanted = scenarios or names
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise SystemExit(f"no scenario {unknown} in {spec.source} (scenarios: {', '.join(names)})")
    data["scenarios"] = [{**s, "warmup": warmup, "window": window, "windows": windows}
                         for s in listed if s["name"] in wanted]
    data["timing"].update(warmup=warmup, window=window)
    kept = [o for o in data["objectives"] if o["metric"].partition(".")[0] in wanted]
    data["objectives"] = kept or [{"metric": f"{wanted[0]}.latency_p95_ms"}]
    data["constraints"]["scenarios"] = {k: v for k, v in data["constraints"]["scenarios"].items() if k in wanted}
    return parse_spec(data, spec.source)


@contextmanager
def load_lock() -> Iterator[None]:
    """Hold ``/tmp/autotune-load.lock`` (no two load tests at once on this machine)."""
    with LOCK.open("a") as fh:
        t0 = time.monotonic()
        fcntl.flock(fh, fcntl.LOCK_EX)
        waited = time.monotonic() - t0
        if waited > 1:
            print(f"  (waited {waited:.0f} s for {LOCK})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- did the knob reach Envoy? -----------------------------------------------------------------------


def _norm(value: Any) -> Any:
    """Protobuf-JSON values comparable: durations ``"0.500s"`` → seconds, numeric strings → numbers."""
    if isinstance(value, str) and value.endswith("s"):
        try:
            return round(float(value[:-1]), 6)
        except ValueError:
            return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _dig(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


_HPO = ("typed_extension_protocol_options", "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options")
#: Where each knob lands in Envoy's config (cluster or route); knobs without one are checked by
#: ``LocalTarget.observed`` (circuit breakers, workers, cgroup quota) on every apply already.
ENVOY_PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "connectionPool.http.idleTimeout": ("cluster", (*_HPO, "idle_timeout")),
    "connectionPool.tcp.connectTimeout": ("cluster", ("connect_timeout",)),
    "outlierDetection.consecutive5xxErrors": ("cluster", ("outlier_detection", "consecutive_5xx")),
    "outlierDetection.consecutiveGatewayErrors": ("cluster", ("outlier_detection", "consecutive_gateway_failure")),
    "outlierDetection.interval": ("cluster", ("outlier_detection", "interval")),
    "outlierDetection.baseEjectionTime": ("cluster", ("outlier_detection", "base_ejection_time")),
    "outlierDetection.maxEjectionPercent": ("cluster", ("outlier_detection", "max_ejection_percent")),
    "loadBalancer.simple": ("cluster", ("lb_policy",)),
    "retries.attempts": ("route", ("route", "retry_policy", "num_retries")),
    "retries.perTryTimeout": ("route", ("route", "retry_policy", "per_try_timeout")),
}


def running_route(target: LocalTarget) -> dict[str, Any]:
    """The route Envoy runs (its static listener's first route), from ``/config_dump``."""
    assert target.envoy is not None
    dump = json.loads(target.envoy.admin_get("/config_dump?resource=static_listeners"))
    for entry in dump.get("configs", []):
        for chain in entry.get("listener", {}).get("filter_chains", []):
            for f in chain.get("filters", []):
                hosts = _dig(f, ("typed_config", "route_config", "virtual_hosts")) or []
                for host in hosts:
                    routes = host.get("routes") or []
                    if routes:
                        return dict(routes[0])
    return {}


def check_applied(target: LocalTarget, knob: str, config: MeshConfig) -> str:
    """``"ok"`` if the running Envoy holds what Istio would write for ``knob`` under ``config``
    (or the knob is one ``observed()`` checks), else what differs."""
    if knob not in ENVOY_PATHS or target.envoy is None:
        return "ok"
    where, path = ENVOY_PATHS[knob]
    if where == "cluster":
        expected: Any = envoy_cluster(config, target.service, [])
        running: Any = target.envoy.cluster_config(cluster_name(target.service))
    else:
        expected, running = envoy_route(config, target.service), running_route(target)
    want, have = _norm(_dig(expected, path)), _norm(_dig(running, path))
    if knob == "loadBalancer.simple" and have is None:
        have = "ROUND_ROBIN"  # proto3 JSON leaves out the enum's zero value
    return "ok" if want == have else f"Envoy runs {have!r}, Istio would write {want!r}"


# -- measuring ---------------------------------------------------------------------------------------


def measure_rows(target: LocalTarget, spec: StudySpec, group: int, knob: str, role: str,
                 value: ParamValue | None, windows: int) -> list[dict[str, Any]]:
    """One config (the default, or ``knob`` = ``value`` on top of it) measured on every scenario of
    ``spec``, as one CSV row per scenario."""
    config = MeshConfig() if value is None else MeshConfig.from_params({knob: value})
    base: dict[str, Any] = {"group": group, "knob": knob, "role": role, "value": "" if value is None else value,
                            "warmup_s": spec.timing.warmup, "window_s": spec.timing.window, "windows": windows,
                            "measured_at": time.strftime("%H:%M:%S")}
    t0 = time.monotonic()
    try:
        m = measure_config(target, spec, config, repeats=windows, early_abort=False)
    except TrialFailed as exc:
        target.restore()
        why = f"{exc}"[:300].replace("\n", " ")
        return [{**base, "scenario": s.name, "failed": why, "wall_s": round(time.monotonic() - t0, 1)}
                for s in spec.scenario_list()]
    applied = check_applied(target, knob, config) if value is not None else "ok"
    rows = []
    for s in spec.scenario_list():
        row = {**base, "scenario": s.name, "applied": applied, "failed": "",
               "wall_s": round(time.monotonic() - t0, 1)}
        for metric in METRICS:
            row[metric] = m.metrics.get(f"{s.name}.{metric}", math.nan)
        seconds = m.metrics.get(f"{s.name}.window_s", 0.0)
        for c in COUNTERS:
            total = m.metrics.get(f"{s.name}.{c}", math.nan)
            row[f"{c}_per_s"] = total / seconds if seconds > 0 else math.nan
        rows.append(row)
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The CSV's rows with numbers as floats (empty if there is no CSV)."""
    if not path.exists():
        return []
    out = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, Any] = dict(row)
            for key in (*METRICS, *(f"{c}_per_s" for c in COUNTERS)):
                text = row.get(key) or ""
                parsed[key] = float(text) if text else math.nan
            out.append(parsed)
    return out


def done_knobs(rows: list[dict[str, Any]], scenarios: list[str]) -> set[str]:
    """Knobs whose whole group (default, tight, loose on every scenario) is in the CSV."""
    have: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        have.setdefault(r["knob"], set()).add((r["role"], r["scenario"]))
    need = {(role, s) for role in ("default", "tight", "loose") for s in scenarios}
    return {k for k, got in have.items() if need <= got}


# -- the verdict -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """The default's repeated measurements of one metric on one scenario."""

    low: float
    high: float
    median: float
    n: int


def default_intervals(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Interval]:
    """(scenario, metric) → min, max and median of the default's measurements."""
    out: dict[tuple[str, str], Interval] = {}
    defaults = [r for r in rows if r["role"] == "default" and not r.get("failed")]
    for scenario in {r["scenario"] for r in defaults}:
        for metric in (*METRICS, *(f"{c}_per_s" for c in COUNTERS)):
            values = [r[metric] for r in defaults if r["scenario"] == scenario and math.isfinite(r[metric])]
            if values:
                out[(scenario, metric)] = Interval(min(values), max(values), float(np.median(values)), len(values))
    return out


@dataclass(frozen=True)
class Effect:
    """One metric of one knob value on one scenario that left the default's interval."""

    metric: str
    value: float
    base: float  # the default's median
    change: float  # relative to the default's median (error rate: absolute; goodput: of the offered rate)
    better: bool
    size: float  # change over its threshold: how far beyond "matters" it is

    def text(self) -> str:
        word = "better" if self.better else "worse"
        if self.metric == "goodput_slo_rps":
            return f"{SHORT[self.metric]} {self.base:.0f}→{self.value:.0f}/s {word}"
        if self.metric == "error_rate":
            return f"{SHORT[self.metric]} {100 * self.change:+.1f} pp {word}"
        if self.change > 1.0:
            return f"{SHORT[self.metric]} ×{1 + self.change:.1f} {word}"
        return f"{SHORT[self.metric]} {100 * self.change:+.0f}% {word}"


def effects(row: dict[str, Any], intervals: dict[tuple[str, str], Interval]) -> list[Effect]:
    """The decision metrics of ``row`` that matter (outside the default's min–max and beyond the
    threshold), largest first. A failed measurement has none (it is reported apart)."""
    out: list[Effect] = []
    if row.get("failed"):
        return out
    for metric, larger_better in DECISION.items():
        ref = intervals.get((row["scenario"], metric))
        v = row[metric]
        if ref is None or not math.isfinite(v):
            continue
        if ref.low <= v <= ref.high:
            continue
        threshold = THRESHOLD[metric]
        if metric == "error_rate":
            change = v - ref.median
        elif metric == "goodput_slo_rps":  # of the offered rate: the default's may be 0
            offered = row["offered_rps"]
            if not offered > 0:
                continue
            change = (v - ref.median) / offered
        else:
            if ref.median == 0:
                continue
            change = (v - ref.median) / abs(ref.median)
        if abs(change) <= threshold:
            continue
        out.append(Effect(metric, v, ref.median, change, (change > 0) == larger_better, abs(change) / threshold))
    return sorted(out, key=lambda e: -e.size)


def verdict_table(rows: list[dict[str, Any]], knobs: list[str], scenarios: list[str]) -> str:
    """Markdown: knob × scenario, the largest effect of each value that matters (``·``: none)."""
    intervals = default_intervals(rows)
    header = ["knob (tight / loose)", *scenarios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for knob in knobs:
        mine = [r for r in rows if r["knob"] == knob and r["role"] != "default"]
        values = {r["role"]: r["value"] for r in mine}
        cells = [f"`{knob}` ({values.get('tight', '?')} / {values.get('loose', '?')})"]
        for s in scenarios:
            parts = []
            for role in ("tight", "loose"):
                row = next((r for r in mine if r["role"] == role and r["scenario"] == s), None)
                if row is None:
                    continue
                if row.get("failed"):
                    parts.append(f"{row['value']}: failed")
                    continue
                found = effects(row, intervals)
                shown = [e for e in (next((e for e in found if not e.better), None),
                                     next((e for e in found if e.better), None)) if e is not None]
                if shown:  # the largest worse and the largest better effect
                    parts.append(f"{row['value']}: " + ", ".join(f"**{e.text()}**" for e in shown))
            cells.append("; ".join(parts) or "·")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_table(rows: list[dict[str, Any]], scenarios: list[str]) -> str:
    """Markdown: the default's median [min–max] per scenario and decision metric."""
    intervals = default_intervals(rows)
    lines = ["| scenario | n | " + " | ".join(SHORT[m] for m in DECISION) + " |",
             "|---|---|" + "---|" * len(DECISION)]
    for s in scenarios:
        cells = []
        n = 0
        for metric in DECISION:
            ref = intervals.get((s, metric))
            if ref is None:
                cells.append("–")
                continue
            n = ref.n
            cells.append(f"{_fmt(metric, ref.median)} [{_fmt(metric, ref.low)}–{_fmt(metric, ref.high)}]")
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(metric: str, v: float) -> str:
    if metric == "error_rate":
        return f"{100 * v:.1f}%"
    if metric == "cpu_used_cores":
        return f"{v:.3f}"
    if metric == "goodput_slo_rps":
        return f"{v:.0f}"
    return f"{v:.1f}"


def detail_table(rows: list[dict[str, Any]], scenarios: list[str]) -> str:
    """Markdown: every knob value that matters somewhere, per scenario, with its figures and the
    Envoy counters (per s) that moved against the default's median."""
    intervals = default_intervals(rows)
    lines = ["| knob = value | scenario | p95 ms | p99 ms | goodput | errors | CPU | Envoy counters /s (default) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["role"] == "default" or row["scenario"] not in scenarios or not effects(row, intervals):
            continue
        moved = []
        for c in COUNTERS:
            v = row[f"{c}_per_s"]
            ref = intervals.get((row["scenario"], f"{c}_per_s"))
            base = ref.median if ref is not None else math.nan
            if math.isfinite(v) and math.isfinite(base) and abs(v - base) > max(1.0, 0.25 * abs(base)):
                moved.append(f"{c.removeprefix('envoy_')} {v:.0f} ({base:.0f})")
        lines.append(f"| `{row['knob'].rsplit('.', 1)[-1]}={row['value']}` | {row['scenario']} | "
                     + " | ".join(_fmt(m, row[m]) for m in DECISION) + f" | {', '.join(moved) or '–'} |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-scenarios.yaml")
    parser.add_argument("--knobs", help="comma-separated subset of the knobs (Istio names or their last part)")
    parser.add_argument("--scenarios", help="comma-separated subset of the spec's scenarios")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per scenario")
    parser.add_argument("--window", type=float, default=2.0, help="seconds per measured window")
    parser.add_argument("--windows", type=int, default=2, help="windows per scenario and value")
    parser.add_argument("--out", type=Path, default=Path("bench/knobs.csv"))
    parser.add_argument("--fresh", action="store_true", help="start a new CSV instead of resuming")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument("--knobs-per-lock", type=int, default=1,
                        help="knob groups measured per hold of the load lock (released in between)")
    args = parser.parse_args()
    check_classified()

    knobs = list(KNOBS)
    if args.knobs:
        wanted = [k.strip() for k in args.knobs.split(",") if k.strip()]
        knobs = [k for k in KNOBS if k.name in wanted or k.name.rsplit(".", 1)[-1] in wanted]
        if len(knobs) != len(wanted):
            raise SystemExit(f"unknown knob in {wanted}; knobs: {', '.join(k.name for k in KNOBS)}")
    raw = load_spec(args.spec)
    if not isinstance(raw.target, LocalTargetSpec):
        raise SystemExit(f"{args.spec}: this benchmark runs on the local target only")
    spec = bench_spec(raw, args.scenarios.split(",") if args.scenarios else None,
                      args.warmup, args.window, args.windows)
    scenarios = [s.name for s in spec.scenario_list()]
    if args.fresh and args.out.exists():
        args.out.unlink()
    rows = read_rows(args.out)
    done = done_knobs(rows, scenarios)
    todo = [k for k in knobs if k.name not in done]
    per_config = APPLY_OVERHEAD_S + sum(s.warmup + args.windows * s.window + SCENARIO_OVERHEAD_S
                                        for s in spec.scenario_list())
    print(f"{len(todo)} of {len(knobs)} knob(s) to measure on {', '.join(scenarios)}: "
          f"{3 * len(todo)} configs x {per_config:.0f} s = about {3 * len(todo) * per_config / 60:.1f} min "
          f"({args.warmup:g} s warm-up + {args.windows} x {args.window:g} s per scenario) -> {args.out}",
          flush=True)
    for name, why in SKIPPED.items():
        print(f"skipped {name}: {why}")
    started = time.monotonic()
    if todo:
        new_file = not args.out.exists()
        assert isinstance(spec.target, LocalTargetSpec)
        target = LocalTarget(spec.target, spec.service, timing=spec.timing)
        with args.out.open("a", newline="") as fh, target:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            group0 = max((int(r["group"]) for r in rows), default=0)
            chunk = max(1, args.knobs_per_lock)
            for first in range(0, len(todo), chunk):
                with load_lock():
                    for i, knob in enumerate(todo[first:first + chunk], first + 1):
                        group: list[dict[str, Any]] = []
                        for role, value in (("default", None), ("tight", knob.tight), ("loose", knob.loose)):
                            got = measure_rows(target, spec, group0 + i, knob.name, role, value, args.windows)
                            group += got
                            print(f"[{i}/{len(todo)}] {knob.name} {role} {'' if value is None else value}: "
                                  + "; ".join(_brief(r) for r in got), flush=True)
                        writer.writerows(group)
                        fh.flush()
                        rows += group
                        print(f"  ({(time.monotonic() - started) / 60:.1f} min)", flush=True)
    wall = time.monotonic() - started
    names = [k.name for k in knobs]
    rows = [r for r in rows if r["scenario"] in scenarios]
    table = verdict_table(rows, names, scenarios)
    print(table)
    print(interval_table(rows, scenarios))
    if todo:
        print(f"measured in {wall / 60:.1f} min")
    if args.no_write:
        return
    skipped = "\n".join(f"- `{k}` not swept: {why}." for k, why in SKIPPED.items())
    failed = [r for r in rows if r.get("failed")]
    not_applied = sorted({f"`{r['knob']}={r['value']}`: {r['applied']}" for r in rows
                          if r.get("applied") not in (None, "", "ok")})
    notes = ""
    if failed:
        notes += "\nFailed measurements: " + "; ".join(f"`{r['knob']}={r['value']}` on {r['scenario']}: "
                                                       f"{r['failed']}" for r in failed) + "\n"
    if not_applied:
        notes += "\nNot applied as Istio writes it: " + "; ".join(not_applied) + "\n"
    write_section("Which knobs matter where", f"""
Each knob swept alone from Istio's default on the local target (`{args.spec}`: {_scenario_text(spec)}),
{args.warmup:g} s warm-up + {args.windows} × {args.window:g} s windows per scenario and value, through
`measure_config` (no noise control, no early abort). Istio's default is measured before each knob's
pair ({len(names)} times per scenario). A value **matters** on a scenario when a metric is outside
the default's min–max there *and* further from its median than {_threshold_text()}. Each value is
measured once: a verdict is one measurement against the default's spread. Cell: per value, the largest
worse and the largest better effect (`·`: none). Detail rows: `{args.out}`.

{table}

Istio's default, median [min–max] over its repeats:

{interval_table(rows, scenarios)}

Values that matter, with the Envoy counters that moved (per second; the default's median in brackets):

{detail_table(rows, scenarios)}

{skipped}
{notes}""")


def _threshold_text() -> str:
    def one(metric: str, t: float) -> str:
        if metric == "error_rate":
            return f"{100 * t:g} pp ({SHORT[metric]})"
        if metric == "goodput_slo_rps":
            return f"{100 * t:g} % of the offered rate ({SHORT[metric]})"
        return f"{100 * t:g} % ({SHORT[metric]})"
    return ", ".join(one(m, t) for m, t in THRESHOLD.items())


def _brief(row: dict[str, Any]) -> str:
    if row.get("failed"):
        return f"{row['scenario']} FAILED"
    flag = "" if row.get("applied", "ok") == "ok" else " NOT APPLIED"
    return (f"{row['scenario']} p99 {row['latency_p99_corrected_ms']:.1f} goodput {row['goodput_slo_rps']:.0f} "
            f"err {100 * row['error_rate']:.1f}% cpu {row['cpu_used_cores']:.2f}{flag}")


def _scenario_text(spec: StudySpec) -> str:
    parts = []
    for s in spec.scenario_list():
        fault = "".join(f", {f.endpoints} endpoint(s) with " + " ".join(
            f"{k} {v:g}" for k, v in f.model_dump(by_alias=True, exclude_defaults=True).items()
            if k != "endpoints") for f in s.faults)
        parts.append(f"{s.name} {s.load.offered_rps:.0f} rps{fault}")
    up = spec.target.upstream if isinstance(spec.target, LocalTargetSpec) else None
    if up is None:
        return "; ".join(parts)
    queue = "none" if up.queue_limit is None else str(up.queue_limit)
    service = (f"; {up.endpoints} endpoints × {up.workers} workers, {up.service_time.distribution} "
               f"{up.service_time.mean_ms:g} ms, queue limit {queue}")
    return "; ".join(parts) + service


if __name__ == "__main__":
    main()
