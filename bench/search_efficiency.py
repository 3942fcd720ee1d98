"""How fast each sampler finds the Pareto front of a recorded landscape (no proxy runs).

    python bench/search_efficiency.py [--landscape bench/landscape.csv] [--seeds 5] [--trials 40]

Runs the real study loop (``autotune.study.run_study``) on ``bench/landscape.csv`` (written by
``bench/record_landscape.py``) through ``autotune.testing.replay``: a ``ReplayTarget`` and a
``ReplayDriver`` sharing ``Landscape.from_csv``. The study is the spec's (objectives p95 latency
and CPU limit, its constraints) with the sampler by name and seed, over the grid's bounds (log
scale for the limits and the CPU), one window per trial, no drift checks and no confirmation, in a
temporary SQLite storage. Each proposal is answered by its nearest grid point (in log space for
the limits and the CPU, by value for concurrency) with the recorded figures, the p95 varied per
window by lognormal noise whose sigma is that config's measured coefficient of variation (seeded);
the CPU limit is exact. Like every study, trial 0 is the Istio-default baseline (its nearest grid
point: 2000m, 2 workers, limits 1024).

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
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import optuna
import pandas as pd

from _results import machine, replace_section
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec, load_spec
from autotune.study import TrialRecord, run_study
from autotune.testing.replay import GRID_COLUMNS, Landscape, RecordedGrid, ReplayDriver, ReplayTarget

SECTION = "## Search efficiency (recorded landscape)"
CHECKPOINTS = (10, 20, 30, 40)
THRESHOLDS = (0.90, 0.95)
REF_CPU = 2.2


@dataclass(frozen=True)
class Point:
    """One recorded grid point, noise-free."""

    p95: float
    cpu: float
    feasible: bool
    failed: bool


class Grid:
    """The recorded grid: the recorded point of each config, the reference front."""

    def __init__(self, grid: RecordedGrid, ref_factor: float = 2.0) -> None:
        self.grid = grid
        self.values = grid.values
        self.points: dict[tuple[float, ...], Point] = {}
        for key, row in grid.rows.items():
            p95 = _number(row["latency_p95_ms"])
            failed = not math.isfinite(p95)
            self.points[key] = Point(p95=p95, cpu=float(row["cpu_reserved_cores"]),
                                     feasible=_truthy(row["feasible"]) and not failed, failed=failed)
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

    def key(self, config: MeshConfig) -> tuple[float, ...]:
        """The grid point a config is answered by."""
        return self.grid.key(self.grid.snap(config))

    def parameters(self) -> dict[str, dict[str, object]]:
        """The spec's parameters over the grid's bounds (log for the limits and the CPU)."""
        out: dict[str, dict[str, object]] = {}
        for name in GRID_COLUMNS:
            low, high = self.values[name][0], self.values[name][-1]
            if name == "proxy.cpuLimit":
                out[name] = {"low": low, "high": high, "log": True}
            else:
                out[name] = {"low": int(low), "high": int(high), "log": name != "proxy.concurrency"}
        return out


def _number(raw: str) -> float:
    try:
        return float(raw) if raw else math.nan
    except ValueError:
        return math.nan


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


def replay_spec(spec: StudySpec, grid: Grid, sampler: str, seed: int, trials: int, storage: str) -> StudySpec:
    """The spec's study as replayed: the grid's space, one window per trial, no drift or confirmation."""
    return spec.with_overrides(**{
        "study.name": f"replay-{sampler}-{seed}", "study.storage": storage, "study.sampler": sampler,
        "study.seed": seed, "study.trials": trials, "parameters": grid.parameters(),
        "measurement.repeats": 1, "measurement.max_repeats": 1, "measurement.drift_every": 0,
        "measurement.confirm_rounds": 0})


def run_replay(grid: Grid, landscape_csv: Path, spec: StudySpec, sampler: str, seed: int,
               trials: int) -> tuple[list[float], int]:
    """One study through ``run_study`` on the replayed landscape: the normalized hypervolume
    after each trial, and how many of the grid's Pareto-optimal configs it tried."""
    land = Landscape.from_csv(landscape_csv, seed=seed)
    with tempfile.TemporaryDirectory(prefix="autotune-replay-") as tmp:
        study_spec = replay_spec(spec, grid, sampler, seed, trials, f"sqlite:///{tmp}/replay.db")
        study = run_study(study_spec, target=ReplayTarget(land), load=ReplayDriver(land))
        keys = [grid.key(TrialRecord.read(t).config) for t in study.get_trials(deepcopy=False)]
    found: list[tuple[float, float]] = []
    curve: list[float] = []
    for key in keys:
        point = grid.points[key]
        if point.feasible:
            found.append((point.p95, point.cpu))
        curve.append(hypervolume(found, grid.ref) / grid.best_hv)
    return curve, len(set(keys) & grid.front)


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
    parser.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    logging.getLogger("autotune").setLevel(logging.ERROR)  # failed grid points are data here
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = load_spec(args.spec)
    frame = pd.read_csv(args.landscape)
    land = Grid(RecordedGrid.read(args.landscape), args.ref_factor)
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
        runs = [run_replay(land, args.landscape, spec, name, seed, args.trials)
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
        "trials to x%: median over seeds, never = not reached (seeds that reached it); "
        "the first trial is the Istio-default baseline; each study is `run_study` on the replay "
        "target and driver",
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
