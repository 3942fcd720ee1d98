"""Measurement noise within one proxy start and across proxy starts.

    python bench/noise.py [--spec search-spaces/local-demo.yaml] [--starts 6] [--windows 3]
                          [--limits 2,0.23,0.12] [--warmup 2] [--window 4] [--no-write]

Measures configs of the demo spec's load on the local target (Istio's defaults but for the CPU
limit: ``--limits`` in cores; the worker count follows the limit as pilot-agent sets it,
ceil(limit)), each ``--starts`` times; every measurement is a new Envoy start (the configs are
applied in turn, as a study's confirmation rounds do) followed by ``--windows`` back-to-back
windows of one load run. Reports, per config:
  within-start CV:   the p95's coefficient of variation over one start's windows (median over starts);
  between-start CV:  the CV over starts of each start's median p95 (what the noise control's
                     median of windows cannot reduce), and of the first window alone;
  between-start share: the share of the p95's variance that lies between starts (one-way ANOVA);
  throttled:         the share of the CFS periods (100 ms) throttled per start, median and max;
  slow starts:       starts whose median p95 is above 1.5x the unthrottled config's median.
Writes the table to bench/RESULTS.md ("Measurement noise").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from _results import write_section
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec, parse_spec
from autotune.study import cv, measure_config
from autotune.targets.local import LocalTarget


def short_spec(path: str, warmup: float, window: float) -> StudySpec:
    """The spec at ``path`` with the given warm-up and window (seconds)."""
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    data.setdefault("timing", {}).update({"warmup": warmup, "window": window})
    return parse_spec(data, path)


def between_share(groups: list[list[float]]) -> float:
    """One-way ANOVA: the share of the variance that lies between groups (0..1), from the
    between-group mean square and the within-group mean square (equal group sizes assumed)."""
    k, n = len(groups), min(len(g) for g in groups)
    if k < 2 or n < 2:
        return float("nan")
    arr = np.array([g[:n] for g in groups], dtype=float)
    within = float(arr.var(axis=1, ddof=1).mean())
    between = max(0.0, float(arr.mean(axis=1).var(ddof=1)) - within / n)
    return between / (between + within) if between + within > 0 else 0.0


def summarize(name: str, starts: list[list[dict[str, float]]], slow_above: float) -> dict[str, object]:
    """One table row from each start's per-window metrics."""
    p95 = [[w["latency_p95_ms"] for w in s] for s in starts]
    medians = [float(np.median(s)) for s in p95]
    throttled = [float(np.mean([w["cpu_throttled_ratio"] for w in s])) for s in starts]
    return {
        "config": name,
        "starts": len(starts),
        "median p95 ms": round(float(np.median(medians)), 2),
        "p95 per start ms (min-max)": f"{min(medians):.1f}-{max(medians):.1f}",
        "within-start CV %": round(100 * float(np.median([cv(s) for s in p95])), 1),
        "between-start CV %, 1 window": round(100 * cv([s[0] for s in p95]), 1),
        "between-start CV %, median": round(100 * cv(medians), 1),
        "between-start share %": round(100 * between_share(p95), 0),
        "slow starts": f"{sum(m > slow_above for m in medians)}/{len(medians)}",
        "throttled % (median, max)": f"{100 * np.median(throttled):.0f}, {100 * max(throttled):.0f}",
        "CPU used cores": round(float(np.median([w["cpu_cores"] for s in starts for w in s])), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml")
    parser.add_argument("--starts", type=int, default=6, help="proxy starts per config")
    parser.add_argument("--windows", type=int, default=3, help="windows per start")
    parser.add_argument("--limits", default="2,0.23,0.12", help="CPU limits in cores, comma-separated")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--raw", type=Path, help="also write every window's metrics here (JSON)")
    parser.add_argument("--from-raw", type=Path, help="measure nothing: tabulate a --raw file of an earlier run")
    args = parser.parse_args()
    spec = short_spec(args.spec, args.warmup, args.window)
    configs = {f"{limit * 1000:.0f}m, {MeshConfig(cpu_limit=limit).effective_concurrency} worker(s)":
               MeshConfig(cpu_limit=limit) for limit in (float(x) for x in args.limits.split(","))}
    if args.from_raw:
        raw = json.loads(args.from_raw.read_text())
        starts, wall, measured = raw["starts"], raw["wall_s"], raw["command"]
        configs = {name: MeshConfig(cpu_limit=limit) for name, limit in raw["limits"].items()}
    else:
        starts, wall = measure(spec, configs, args.starts, args.windows)
        measured = "python " + " ".join(["bench/noise.py", *sys.argv[1:]])
        if args.raw:
            args.raw.write_text(json.dumps({"starts": starts, "wall_s": wall, "command": measured,
                                            "limits": {n: c.effective_cpu_limit for n, c in configs.items()}}))
    report(spec, args, configs, starts, wall, measured)


def measure(spec: StudySpec, configs: dict[str, MeshConfig], rounds: int,
            windows: int) -> tuple[dict[str, list[list[dict[str, float]]]], float]:
    """Each config's per-window metrics per start, and the seconds it took."""
    starts: dict[str, list[list[dict[str, float]]]] = {name: [] for name in configs}
    t0 = time.monotonic()
    with LocalTarget(spec.target, spec.service) as target:  # type: ignore[arg-type]
        for i in range(rounds):
            order = list(configs.items()) if i % 2 == 0 else list(configs.items())[::-1]
            for name, config in order:
                m = measure_config(target, spec, config, repeats=windows, early_abort=False)
                starts[name].append(m.windows)
                print(f"start {i + 1}/{rounds} {name:22s} p95 per window "
                      + " ".join(f"{w['latency_p95_ms']:6.2f}" for w in m.windows)
                      + "  throttled " + " ".join(f"{w['cpu_throttled_ratio']:.2f}" for w in m.windows)
                      + f"  CPU {m.metrics['cpu_cores']:.3f}", flush=True)
    return starts, time.monotonic() - t0


def report(spec: StudySpec, args: argparse.Namespace, configs: dict[str, MeshConfig],
           starts: dict[str, list[list[dict[str, float]]]], wall: float, measured: str) -> None:
    """Print the table and, unless ``--no-write``, write it to RESULTS.md."""
    unthrottled = max(configs, key=lambda n: configs[n].effective_cpu_limit)
    slow_above = 1.5 * float(np.median([np.median([w["latency_p95_ms"] for w in s]) for s in starts[unthrottled]]))
    table = pd.DataFrame([summarize(name, runs, slow_above) for name, runs in starts.items()]).to_markdown(index=False)
    print(table)
    print(f"{wall:.0f} s of load")
    if args.no_write:
        return
    load = spec.load
    rounds = len(next(iter(starts.values())))
    source = f"Measured by `{measured}`.\n" if args.from_raw else ""
    write_section("Measurement noise", f"""
{source}Load: {load.users} users × {load.per_user_rate:g} rps (the demo spec's), warm-up {args.warmup:g} s, then
{args.windows} windows of {args.window:g} s per start; {rounds} starts per config, each a new Envoy
(configs applied in turn, order reversed every other round), {wall / 60:.1f} min of load. Istio's
defaults but the CPU limit; workers = ceil(limit) as pilot-agent sets them. *1 window*: each start's
first window alone (a study without noise control); *median*: each start's median of its windows (the
noise control). A slow start: median p95 above 1.5× the unthrottled config's median
({slow_above:.1f} ms). Throttled: share of CFS periods throttled, mean over a start's windows.

{table}
""")


if __name__ == "__main__":
    main()
