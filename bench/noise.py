"""Measurement noise before and after the noise controls.

    python bench/noise.py [--spec search-spaces/local-demo.yaml] [--repeats 5] [--knee 0.12]

Measures three configs of the demo spec's load on the local target — unthrottled (Istio's 2000m
default), at the throttling knee, deeply throttled (50m) — ``--repeats`` times each, in two modes,
interleaved so drift hits both alike:
  before: one window per measurement (what a study did without noise control);
  after:  the spec's noise control (median of ``repeats`` windows, more while p95's CV is high).
Prints the coefficient of variation over the repeats of p50, p95, p99 and proxy CPU, and writes
the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from _results import write_section
from autotune.mesh import MeshConfig
from autotune.spec import load_spec
from autotune.study import cv, measure_config
from autotune.targets.local import LocalTarget

METRICS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cpu_cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--knee", type=float, default=0.12, help="CPU limit (cores) at the throttling knee")
    parser.add_argument("--deep", type=float, default=0.05, help="a deeply throttled CPU limit (cores)")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    configs = {"unthrottled (2000m)": MeshConfig(),
               f"knee ({args.knee * 1000:.0f}m)": MeshConfig(cpu_limit=args.knee),
               f"deep ({args.deep * 1000:.0f}m)": MeshConfig(cpu_limit=args.deep)}
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    with LocalTarget(spec.target, spec.service) as target:  # type: ignore[arg-type]
        for i in range(args.repeats):
            for name, config in configs.items():
                for mode in ("before", "after"):
                    t0 = time.monotonic()
                    m = measure_config(target, spec, config, repeats=1 if mode == "before" else None)
                    runs.setdefault((name, mode), []).append(m.metrics)
                    seconds.setdefault((name, mode), []).append(time.monotonic() - t0)
                    print(f"repeat {i + 1}/{args.repeats} {name:22s} {mode:6s} p95 "
                          f"{m.metrics['latency_p95_ms']:8.2f} ms  CPU {m.metrics['cpu_cores']:.3f}", flush=True)
    rows = []
    for (name, mode), values in runs.items():
        row: dict[str, object] = {"config": name, "mode": mode}
        for metric in METRICS:
            row[f"{metric.removeprefix('latency_').removesuffix('_ms')} CV %"] = round(
                100 * cv([v[metric] for v in values]), 1)
        row["median p95 ms"] = round(float(np.median([v["latency_p95_ms"] for v in values])), 2)
        row["s per measurement"] = round(float(np.median(seconds[(name, mode)])), 1)
        rows.append(row)
    table = pd.DataFrame(rows).to_markdown(index=False)
    print(table)
    load = spec.load
    write_section("Measurement noise", f"""
Load: {load.users} users × {load.per_user_rate:g} rps, warm-up {spec.timing.warmup:g} s, windows of
{spec.timing.window:g} s. *before*: one window per measurement; *after*: median of
{spec.measurement.repeats}–{spec.measurement.max_repeats} windows (more while p95's CV >
{spec.measurement.target_cv:.0%}). CV over {args.repeats} repeats, interleaved.

{table}
""")


if __name__ == "__main__":
    main()
