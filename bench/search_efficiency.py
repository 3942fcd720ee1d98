"""How fast each sampler finds the Pareto front of a recorded landscape (no proxy runs).

    python bench/search_efficiency.py [--landscape bench/landscape.csv] [--seeds 5] [--trials 40]

Replays ``bench/landscape.csv`` (written by ``bench/record_landscape.py``) as the target of a
study built like ``autotune.study``: the spec's objectives (p95 latency, CPU limit), the sampler
from ``autotune.samplers.make_sampler(name, seed)``, the parameters proposed with the study's
own ``suggest`` over the grid's bounds (log scale for the limits and the CPU), and the constraints
(error rate, throughput) set with ``Trial.set_constraint`` from the recorded error_rate and
throughput_ratio. Each proposal is snapped to the nearest grid point (in log space for the limits
and the CPU, nearest value for concurrency) and answered with the recorded p95 times lognormal
noise whose sigma is that config's measured coefficient of variation (seeded); the CPU limit is
exact. A config whose recording failed fails the trial, as in a real study. Like a real study,
trial 0 is the Istio-default baseline (its nearest grid point) unless --no-baseline.

After each trial it computes the 2-D hypervolume of the feasible Pareto front (recorded, noise-free
values of the configs tried so far; reference point = (--ref-factor, default 2, x the best
feasible p95 of the landscape, 2.2 cores)) divided by the hypervolume of the whole grid's feasible front. The table
gives, per sampler, the median over seeds of that ratio after 10/20/30/40 trials and the trials
needed to reach 90 % and 95 % (median over all seeds, a seed that never reached it counting as
never; and how many seeds reached it). Samplers: tpe, nsga2, random, and gp when torch imports.
The table is printed and written to bench/RESULTS.md under "## Search efficiency (recorded
landscape)", replacing that section and keeping the others (--no-write to skip).
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from _results import machine, replace_section
from autotune.mesh import PARAMETERS, MeshConfig
from autotune.spec import SearchParam, StudySpec, load_spec
from autotune.study import CONSTRAINT_NAMES, constraint_values, make_sampler, suggest

SECTION = "## Search efficiency (recorded landscape)"
#: Grid columns of the landscape CSV, by Istio name.
PARAM_COLUMNS = ("proxy.cpuLimit", "proxy.concurrency", "connectionPool.tcp.maxConnections",
                 "connectionPool.http.http1MaxPendingRequests")
#: The grid point standing in for Istio's defaults (2000m, ceil(2) workers, limits "unset").
BASELINE = {"proxy.cpuLimit": 2.0, "proxy.concurrency": 2, "connectionPool.tcp.maxConnections": 1024,
            "connectionPool.http.http1MaxPendingRequests": 1024}
CHECKPOINTS = (10, 20, 30, 40)
THRESHOLDS = (0.90, 0.95)
REF_CPU = 2.2


@dataclass(frozen=True)
class Point:
    """One recorded grid point."""

    p95: float
    p95_cv: float
    cpu: float
    error_rate: float
    throughput_ratio: float
    feasible: bool
    failed: bool


class Landscape:
    """The recorded grid: lookup by snapped config, the search space, the reference front."""

    def __init__(self, frame: pd.DataFrame, ref_factor: float = 2.0) -> None:
        self.values: dict[str, list[float]] = {
            name: sorted({float(v) for v in frame[name]}) for name in PARAM_COLUMNS}
        self.points: dict[tuple[float, ...], Point] = {}
        for _, row in frame.iterrows():
            p95 = float(row["latency_p95_ms"]) if pd.notna(row["latency_p95_ms"]) else math.nan
            failed = not math.isfinite(p95)
            self.points[self.key({n: float(row[n]) for n in PARAM_COLUMNS})] = Point(
                p95=p95,
                p95_cv=float(row["cv_latency_p95_ms"]) if pd.notna(row["cv_latency_p95_ms"]) else 0.0,
                cpu=float(row["cpu_reserved_cores"]),
                error_rate=float(row["error_rate"]) if pd.notna(row["error_rate"]) else 1.0,
                throughput_ratio=float(row["throughput_ratio"]) if pd.notna(row["throughput_ratio"]) else 0.0,
                feasible=_truthy(row["feasible"]) and not failed,
                failed=failed,
            )
        feasible = [p for p in self.points.values() if p.feasible]
        if not feasible:
            raise SystemExit("the landscape has no feasible config; nothing to compare against")
        # A config counts if its p95 is under ref_factor x the best feasible p95: the front then
        # rewards finding low latency at low CPU, not merely any feasible config.
        self.ref = (ref_factor * min(p.p95 for p in feasible), REF_CPU)
        #: The grid's Pareto-optimal configs (recorded values).
        self.front = {k for k, p in self.points.items() if p.feasible and not any(
            q.feasible and q.p95 <= p.p95 and q.cpu <= p.cpu and (q.p95, q.cpu) != (p.p95, p.cpu)
            for q in self.points.values())}
        self.best_hv = hypervolume([(p.p95, p.cpu) for p in feasible], self.ref)

    @staticmethod
    def key(params: dict[str, float]) -> tuple[float, ...]:
        return tuple(round(float(params[n]), 6) for n in PARAM_COLUMNS)

    def space(self) -> list[SearchParam]:
        """The study's search space over the grid's bounds (log for the limits and the CPU)."""
        out = []
        for name in PARAM_COLUMNS:
            info, vals = PARAMETERS[name], self.values[name]
            out.append(SearchParam(name=name, info=info, low=vals[0], high=vals[-1],
                                   log=name != "proxy.concurrency"))
        return out

    def snap(self, config: MeshConfig) -> dict[str, float]:
        """The nearest grid point: in log space for limits and CPU, by value for concurrency."""
        params = config.to_params()
        out: dict[str, float] = {}
        for name in PARAM_COLUMNS:
            vals, v = self.values[name], float(params[name])
            if name == "proxy.concurrency":
                out[name] = min(vals, key=lambda g: (abs(g - v), g))
            else:
                out[name] = min(vals, key=lambda g: (abs(math.log(g) - math.log(v)), g))
        return out


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both minimized) and bounded by ``ref``."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if not front or y < front[-1][1]:
            front.append((x, y))
    edges = [x for x, _ in front[1:]] + [ref[0]]
    return sum((x_next - x) * (ref[1] - y) for (x, y), x_next in zip(front, edges, strict=True))


def run_replay(land: Landscape, spec: StudySpec, sampler_name: str, seed: int, trials: int,
               baseline: bool) -> tuple[list[float], int]:
    """One replayed study: the normalized hypervolume after each trial, and how many of the
    grid's Pareto-optimal configs it tried."""
    sampler = make_sampler(sampler_name, seed)
    study = optuna.create_study(directions=[o.direction for o in spec.objectives], sampler=sampler)
    space = land.space()
    if baseline:
        study.enqueue_trial(BASELINE)
    noise = np.random.default_rng([seed, 20260101])
    found: list[tuple[float, float]] = []
    curve: list[float] = []
    tried: set[tuple[float, ...]] = set()
    for _ in range(trials):
        trial = study.ask()
        params = land.snap(suggest(trial, space))
        point = land.points[land.key(params)]
        tried.add(land.key(params))
        trial.set_user_attr("grid", params)
        if point.failed:
            study.tell(trial, state=TrialState.FAIL)
        else:
            p95 = point.p95 * float(np.exp(noise.normal(0.0, point.p95_cv)))
            metrics = {"latency_p95_ms": p95, "cpu_reserved_cores": point.cpu,
                       "error_rate": point.error_rate, "throughput_ratio": point.throughput_ratio}
            for name, value in zip(CONSTRAINT_NAMES, constraint_values(spec.constraints, metrics),
                                   strict=True):
                trial.set_constraint(name, value)
            study.tell(trial, [metrics[o.metric] for o in spec.objectives])
            if point.feasible:
                found.append((point.p95, point.cpu))
        curve.append(hypervolume(found, land.ref) / land.best_hv)
    return curve, len(tried & land.front)


def first_reaching(curve: list[float], threshold: float) -> float:
    """1-based trial at which the curve first reaches ``threshold`` (inf if never)."""
    for i, v in enumerate(curve, 1):
        if v >= threshold - 1e-12:
            return float(i)
    return math.inf


def summarize(curves: dict[str, list[list[float]]], fronts: dict[str, list[int]], front_size: int,
              trials: int) -> pd.DataFrame:
    rows = []
    for name, runs in curves.items():
        row: dict[str, object] = {"sampler": name, "seeds": len(runs)}
        for n in CHECKPOINTS:
            if n <= trials:
                row[f"HV@{n}"] = f"{statistics.median(r[n - 1] for r in runs):.3f}"
        for th in THRESHOLDS:
            hits = [first_reaching(r, th) for r in runs]
            med = statistics.median(hits)
            reached = sum(math.isfinite(h) for h in hits)
            shown = f"{med:g}" if math.isfinite(med) else f">{trials}"
            row[f"trials to {th:.0%}"] = f"{shown} ({reached}/{len(runs)})"
        row[f"front found @{trials}"] = f"{statistics.median(fronts[name]):g}/{front_size}"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landscape", type=Path, default=Path("bench/landscape.csv"))
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml", help="objectives and constraints")
    parser.add_argument("--samplers", default="tpe,nsga2,random,gp", help="comma-separated; gp only if torch imports")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per sampler")
    parser.add_argument("--trials", type=int, default=40, help="trials per study (the baseline counts)")
    parser.add_argument("--ref-factor", type=float, default=2.0,
                        help="reference p95 = this x the best feasible p95 of the landscape")
    parser.add_argument("--no-baseline", action="store_true", help="do not start with the Istio-default point")
    parser.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = load_spec(args.spec)
    frame = pd.read_csv(args.landscape)
    land = Landscape(frame, args.ref_factor)
    grid_size = math.prod(len(v) for v in land.values.values())
    front = [p for p in land.points.values() if p.feasible]
    notes = [f"landscape: {args.landscape} ({len(frame)} of {grid_size} grid configs, "
             f"{len(front)} feasible, {sum(p.failed for p in land.points.values())} failed); "
             f"reference point ({land.ref[0]:.2f} ms, {land.ref[1]:g} cores); "
             f"best hypervolume {land.best_hv:.3f}"]
    if len(frame) < grid_size:
        raise SystemExit(f"{args.landscape} holds {len(frame)} of {grid_size} grid configs; "
                         "finish bench/record_landscape.py first")
    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if "gp" in names:
        try:
            import torch  # noqa: F401
        except ImportError:
            names.remove("gp")
            notes.append("gp: skipped, torch does not import (pip install torch==2.13.0 for the CPU build)")
    curves: dict[str, list[list[float]]] = {}
    fronts: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.monotonic()
        runs = [run_replay(land, spec, name, seed, args.trials, not args.no_baseline)
                for seed in range(args.seeds)]
        curves[name] = [curve for curve, _ in runs]
        fronts[name] = [found for _, found in runs]
        seconds[name] = time.monotonic() - t0
        print(f"{name}: {args.seeds} seeds x {args.trials} trials in {seconds[name]:.1f}s", file=sys.stderr)
    table = summarize(curves, fronts, len(land.front), args.trials).to_markdown(index=False)
    command = "python bench/search_efficiency.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    body = "\n".join([
        f"Machine: {machine()}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        f"Command: `{command}`.",
        "",
        *(f"- {n}" for n in notes),
        f"- HV@n: median over seeds 0..{args.seeds - 1} of the hypervolume of the feasible front "
        "(recorded values of the configs tried) after n trials / the whole grid's; "
        "trials to x%: median over seeds, never = not reached (seeds that reached it)"
        + ("; the first trial is the Istio-default baseline" if not args.no_baseline else ""),
        f"- front found: median over seeds of how many of the grid's {len(land.front)} Pareto-optimal "
        "configs (recorded values: " + ", ".join(
            f"{land.points[k].p95:.2f} ms @ {land.points[k].cpu:g} cores"
            for k in sorted(land.front, key=lambda k: land.points[k].cpu)) + ") the study tried",
        "- replay time per sampler: " + ", ".join(f"{n} {s:.1f}s" for n, s in seconds.items()),
        "",
        table,
    ])
    print(body)
    if not args.no_write:
        replace_section(args.results, SECTION, body)
        print(f"\nwritten to {args.results} under {SECTION!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
