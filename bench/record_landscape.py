"""Measure configs once each on the local target and write the landscape to a CSV.

    python bench/record_landscape.py [--spec search-spaces/local-demo.yaml] [--out bench/landscape.csv]
    python bench/record_landscape.py --scenarios [--spec search-spaces/local-scenarios.yaml]
        [--out bench/landscape-scenarios.csv] [--configs 34] [--design-seed 0]

Scenario mode (``--scenarios``): a seeded Latin-hypercube design of --configs configs (the first is
Istio's defaults) over the scenario spec's search space with the resilience knobs added
(``bench/_scenario_space.py``: connectionPool.http.maxRetries, outlierDetection.consecutive5xxErrors,
loadBalancer.simple, and proxy.cpuLimit also unset), each measured through ``measure_config``
under every scenario of the spec (its loads, faults and SLO; warm-up --warmup and --repeats
windows of --duration per scenario; no early abort, so every scenario is recorded). One row per
config: ``config`` (its index in the design), the parameters by Istio name (blank = left out),
per scenario ``<scenario>.<metric>`` and ``<scenario>.cv_<metric>`` (the spread over the
windows), ``feasible``/``reason`` by the spec's constraints, ``fail`` (a ``FailReason``) and
``wall_s``. ``autotune.testing.scenario_grid.ScenarioGrid`` replays it. Resumable like the grid.

Grid mode (the default):

The grid (60 configs) is proxy.cpuLimit {0.05, 0.1, 0.2, 0.5, 2.0} x proxy.concurrency {1, 2}
x connectionPool.tcp.maxConnections {2, 16, 1024} x connectionPool.http.http1MaxPendingRequests
{1, 1024}; http2MaxRequests stays at Istio's default. Each config is measured with the spec's load
(the demo: 300 requests/s) over a short warm-up (--warmup, 2 s) and --repeats (2) windows of
--duration (4 s), through ``measure_config`` on a real Envoy with a cgroup CPU quota.

One CSV row per config: the parameter values by Istio name, p50/p95/p99 and their coefficients of
variation over the windows, cpu_cores (measured), cpu_reserved_cores (the limit), error_rate,
throughput_ratio, feasible (the spec's constraints hold and p95 is a number), and why not.
A config whose measurement failed (``TrialFailed``) is recorded infeasible with the reason, and the
target is restored to Istio's defaults. Configs run in a fixed shuffled order (--order-seed), so slow
drift of the machine does not line up with one parameter. The script is resumable: configs already
in the CSV are skipped, so run it again after an interruption. About 12 minutes for the full grid.
``bench/search_efficiency.py`` replays the CSV.

Hold ``flock /tmp/autotune-load.lock`` while it runs (it loads the machine).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import qmc

from _scenario_space import scenario_space_spec
from autotune.errors import TrialFailed
from autotune.mesh import NO_LIMIT, MeshConfig, ParamValue
from autotune.spec import LocalTargetSpec, SearchParam, StudySpec, load_spec
from autotune.study import measure_config, objective_values, violations
from autotune.targets.local import LocalTarget

#: The grid, by Istio name; the order of the keys is the order of the CSV's parameter columns.
GRID: dict[str, list[float]] = {
    "proxy.cpuLimit": [0.05, 0.1, 0.2, 0.5, 2.0],
    "proxy.concurrency": [1, 2],
    "connectionPool.tcp.maxConnections": [2, 16, 1024],
    "connectionPool.http.http1MaxPendingRequests": [1, 1024],
}
PARAM_COLUMNS = list(GRID)
LATENCIES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
COLUMNS = [
    *PARAM_COLUMNS,
    *LATENCIES,
    *(f"cv_{k}" for k in LATENCIES),
    "cpu_cores", "cpu_reserved_cores", "error_rate", "throughput_ratio", "achieved_rps",
    "windows", "feasible", "reason", "wall_s",
]


def grid_configs(order_seed: int) -> list[dict[str, float]]:
    """Every grid point as Istio-named values, in a fixed shuffled order."""
    points = [dict(zip(PARAM_COLUMNS, values, strict=True))
              for values in itertools.product(*GRID.values())]
    random.Random(order_seed).shuffle(points)
    return points


def config_key(params: dict[str, float] | dict[str, str]) -> tuple[float, ...]:
    """A grid point's identity, comparable between fresh values and values read back from the CSV."""
    return tuple(round(float(params[name]), 6) for name in PARAM_COLUMNS)


def recorded_keys(path: Path) -> set[tuple[float, ...]]:
    """The configs the CSV already holds (empty if there is no CSV yet)."""
    if not path.exists():
        return set()
    with path.open(newline="") as fh:
        return {config_key(row) for row in csv.DictReader(fh)}


def measure_row(target: LocalTarget, spec: StudySpec, params: dict[str, float],
                repeats: int) -> dict[str, Any]:
    """One grid point measured (or failed) as a CSV row."""
    config = MeshConfig.from_params(params)
    row: dict[str, Any] = {name: params[name] for name in PARAM_COLUMNS}
    row["cpu_reserved_cores"] = config.effective_cpu_limit
    t0 = time.monotonic()
    try:
        m = measure_config(target, spec, config, repeats=repeats)
    except TrialFailed as exc:
        row.update(feasible=False, reason=f"TrialFailed {exc}"[:500].replace("\n", " "))
        target.restore()
    else:
        metrics = m.metrics
        for key in LATENCIES:
            row[key] = metrics[key]
            row[f"cv_{key}"] = m.spread.get(key, 0.0)
        for key in ("cpu_cores", "error_rate", "throughput_ratio", "achieved_rps"):
            row[key] = metrics[key]
        row["windows"] = int(metrics["windows"])
        broken = violations(spec.constraints, metrics)
        if not math.isfinite(metrics["latency_p95_ms"]):
            broken.append("no successful request")
        row.update(feasible=not broken, reason="; ".join(broken))
    row["wall_s"] = round(time.monotonic() - t0, 2)
    return row


# -- scenario mode ---------------------------------------------------------------------------------

#: Per-scenario metrics recorded (those the study's objectives and constraints may name, and the
#: proxy's event counters where the target reports them).
SCENARIO_COLUMNS = (
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "latency_p50_corrected_ms", "latency_p95_corrected_ms", "latency_p99_corrected_ms",
    "goodput_rps", "goodput_slo_rps", "error_rate", "achieved_rps", "offered_rps", "throughput_ratio",
    "cpu_used_cores", "cpu_requested_cores", "cpu_limit_cores", "cpu_per_1k_rps", "cpu_throttled_ratio",
    "envoy_pending_overflow", "envoy_cx_overflow", "envoy_retries", "envoy_retry_overflow",
    "envoy_ejections", "envoy_upstream_503", "envoy_upstream_resets",
)
#: Metrics whose spread over the windows is recorded (``<scenario>.cv_<metric>``): the replay's noise.
SPREAD_COLUMNS = ("latency_p95_ms", "latency_p95_corrected_ms", "error_rate", "throughput_ratio",
                  "cpu_used_cores", "goodput_slo_rps")
#: Share of the design that runs without a CPU limit (proxy.cpuLimit unset).
UNSET_SHARE = 0.2


def scenario_columns(spec: StudySpec) -> list[str]:
    """The CSV's columns for ``spec``: the design index, the parameters, the per-scenario metrics."""
    per = [f"{s.name}.{m}" for s in spec.scenario_list() for m in SCENARIO_COLUMNS]
    per += [f"{s.name}.cv_{m}" for s in spec.scenario_list() for m in SPREAD_COLUMNS]
    return ["config", *(p.name for p in spec.search_space()), *per, "feasible", "reason", "fail", "wall_s"]


def _value(p: SearchParam, u: float) -> ParamValue:
    """The value at position ``u`` in [0, 1) of ``p``'s range (log where ``p.log``)."""
    if p.info.kind == "choice":
        return p.choices[min(int(u * len(p.choices)), len(p.choices) - 1)]
    x = p.low * (p.high / p.low) ** u if p.log else p.low + u * (p.high - p.low)
    if p.info.kind == "cpu":
        return round(x, 3)
    return int(min(max(round(x), p.low), p.high))


def design(space: list[SearchParam], n: int, seed: int) -> list[dict[str, ParamValue]]:
    """Istio's defaults (``{}``), then ``n - 1`` configs of a seeded Latin hypercube over
    ``space`` (one more dimension decides a CPU limit left unset, for ``UNSET_SHARE`` of them)."""
    sample = qmc.LatinHypercube(d=len(space) + 1, seed=np.random.default_rng(seed)).random(max(0, n - 1))
    out: list[dict[str, ParamValue]] = [{}]
    for u in sample:
        params = {p.name: _value(p, float(u[j])) for j, p in enumerate(space)}
        if any(p.unset for p in space) and u[-1] < UNSET_SHARE:
            params["proxy.cpuLimit"] = NO_LIMIT
        out.append(params)
    return out


def recorded_configs(path: Path) -> set[int]:
    """The design indices the CSV already holds."""
    if not path.exists():
        return set()
    with path.open(newline="") as fh:
        return {int(row["config"]) for row in csv.DictReader(fh)}


def measure_scenarios(target: LocalTarget, spec: StudySpec, index: int, params: dict[str, ParamValue],
                      repeats: int) -> dict[str, Any]:
    """One config of the design measured under every scenario (or failed), as a CSV row."""
    config = MeshConfig.from_params(params)
    row: dict[str, Any] = {"config": index, **params}
    t0 = time.monotonic()
    try:
        m = measure_config(target, spec, config, repeats=repeats, early_abort=False)
    except TrialFailed as exc:
        row.update(feasible=False, fail=exc.reason.value, reason=f"{exc}"[:300].replace("\n", " "))
        target.restore()
    else:
        for s in spec.scenario_list():
            for key in SCENARIO_COLUMNS:
                if f"{s.name}.{key}" in m.metrics:
                    row[f"{s.name}.{key}"] = m.metrics[f"{s.name}.{key}"]
            for key in SPREAD_COLUMNS:
                row[f"{s.name}.cv_{key}"] = m.spread.get(f"{s.name}.{key}", 0.0)
        first = spec.scenario_list()[0].name
        broken = violations(spec.scenario_list(), m.metrics)
        try:
            objective_values(spec.objectives, m.metrics, first)
        except ValueError as exc:
            broken.append(str(exc))
        row.update(feasible=not broken, reason="; ".join(broken))
    row["wall_s"] = round(time.monotonic() - t0, 2)
    return row


def short_spec(spec: StudySpec, warmup: float, window: float) -> StudySpec:
    """``spec`` with every scenario's warm-up and window set to ``warmup`` / ``window``."""
    scenarios = [{**s, "warmup": warmup, "window": window}
                 for s in spec.model_dump(by_alias=False)["scenarios"]]
    return spec.with_overrides(**{"timing.warmup": warmup, "timing.window": window, "scenarios": scenarios})


def _shown(spec: StudySpec, row: dict[str, Any]) -> str:
    """The row's objective values, or why it failed."""
    if row.get("fail"):
        return f"failed ({row['fail']})"
    first = spec.scenario_list()[0].name
    return " ".join(f"{o.metric}={float(row.get(o.metric if '.' in o.metric else f'{first}.{o.metric}', math.nan)):.4g}"
                    for o in spec.objectives)


def record_scenarios(args: argparse.Namespace) -> None:
    """Scenario mode (see the module docstring)."""
    spec = short_spec(scenario_space_spec(args.spec), args.warmup, args.duration)
    if not isinstance(spec.target, LocalTargetSpec):
        raise SystemExit(f"{args.spec}: this benchmark runs on the local target only")
    space = spec.search_space()
    configs = design(space, args.configs, args.design_seed)
    seen = recorded_configs(args.out)
    todo = [(i, p) for i, p in enumerate(configs) if i not in seen]
    if args.limit is not None:
        todo = todo[:args.limit]
    if not todo:
        print(f"{args.out}: all {len(configs)} configs recorded; nothing to do")
        return
    per_config = sum(s.warmup + args.repeats * s.window for s in spec.scenario_list())
    print(f"{len(todo)} of {len(configs)} configs to measure, {len(spec.scenario_list())} scenarios "
          f"({', '.join(s.name for s in spec.scenario_list())}), {per_config:g} s of load each -> {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    started = time.monotonic()
    target = LocalTarget(spec.target, spec.service, timing=spec.timing)
    with args.out.open("a", newline="") as fh, target:
        target.check_supported(space)
        writer = csv.DictWriter(fh, fieldnames=scenario_columns(spec))
        if new_file:
            writer.writeheader()
        for n, (index, params) in enumerate(todo, 1):
            row = measure_scenarios(target, spec, index, params, args.repeats)
            writer.writerow(row)
            fh.flush()
            flag = "ok " if row["feasible"] else "INF"
            print(f"[{n:2d}/{len(todo)}] #{index:<3d} {flag} {MeshConfig.from_params(params).describe():<70} "
                  f"{_shown(spec, row)} {row['reason']}  ({row['wall_s']}s, "
                  f"{(time.monotonic() - started) / 60:.1f} min)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", action="store_true", help="scenario mode (see above)")
    parser.add_argument("--spec", default=None, help="study spec (load, target; default: "
                        "search-spaces/local-demo.yaml, with --scenarios search-spaces/local-scenarios.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write/extend (default: "
                        "bench/landscape.csv, with --scenarios bench/landscape-scenarios.csv)")
    parser.add_argument("--configs", type=int, default=34, help="--scenarios: configs in the design")
    parser.add_argument("--design-seed", type=int, default=0, help="--scenarios: seed of the design")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per config")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per window (default 4, with --scenarios 3)")
    parser.add_argument("--repeats", type=int, default=2, help="windows per config")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the measuring order")
    parser.add_argument("--limit", type=int, default=None, help="measure at most this many new configs")
    args = parser.parse_args()
    if args.scenarios:
        args.spec = args.spec or "search-spaces/local-scenarios.yaml"
        args.out = args.out or Path("bench/landscape-scenarios.csv")
        args.duration = args.duration or 3.0
        record_scenarios(args)
        return
    args.spec = args.spec or "search-spaces/local-demo.yaml"
    args.out = args.out or Path("bench/landscape.csv")
    args.duration = args.duration or 4.0

    spec = load_spec(args.spec).with_overrides(**{"timing.warmup": args.warmup, "timing.window": args.duration})
    if not isinstance(spec.target, LocalTargetSpec):
        raise SystemExit(f"{args.spec}: this benchmark runs on the local target only")
    grid = grid_configs(args.order_seed)
    seen = recorded_keys(args.out)
    todo = [p for p in grid if config_key(p) not in seen]
    total = len(grid)
    done = total - len(todo)
    if args.limit is not None:
        todo = todo[:args.limit]
    if not todo:
        print(f"{args.out}: all {total} configs recorded; nothing to do")
        return
    print(f"{len(todo)} of {total} configs to measure, {spec.load.offered_rps:.0f} rps, warm-up "
          f"{spec.timing.warmup:g}s + {args.repeats} x {spec.timing.window:g}s each -> {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    started = time.monotonic()
    target = LocalTarget(spec.target, spec.service)
    with args.out.open("a", newline="") as fh, target:
        target.check_supported(spec.search_space())
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for i, params in enumerate(todo, 1):
            row = measure_row(target, spec, params, args.repeats)
            writer.writerow(row)
            fh.flush()
            config = MeshConfig.from_params(params).describe()
            if row.get("latency_p95_ms") is not None:
                shown = (f"p95 {float(row['latency_p95_ms']):7.2f} ms (cv {float(row['cv_latency_p95_ms']):.2f}) "
                         f"cpu {float(row['cpu_cores']):.3f} err {float(row['error_rate']):.3f} "
                         f"tput {float(row['throughput_ratio']):.2f}")
            else:
                shown = "failed"
            flag = "ok " if row["feasible"] else "INF"
            elapsed = time.monotonic() - started
            print(f"[{done + i:2d}/{total}] {flag} {config:<75} {shown} {row['reason']}  "
                  f"({row['wall_s']}s, {elapsed / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
