"""Measure a grid of configs once each on the local target and write the landscape to a CSV.

    python bench/record_landscape.py [--spec search-spaces/local-demo.yaml] [--out bench/landscape.csv]

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

from autotune.errors import TrialFailed
from autotune.mesh import MeshConfig
from autotune.spec import LocalTargetSpec, StudySpec, load_spec
from autotune.study import measure_config, violations
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml", help="study spec (load, target)")
    parser.add_argument("--out", type=Path, default=Path("bench/landscape.csv"), help="CSV to write/extend")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per config")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--repeats", type=int, default=2, help="windows per config")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the measuring order")
    parser.add_argument("--limit", type=int, default=None, help="measure at most this many new configs")
    args = parser.parse_args()

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
