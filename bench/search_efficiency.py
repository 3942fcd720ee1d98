"""How fast each sampler finds the Pareto front of a recorded landscape (no proxy runs).

    python bench/search_efficiency.py [--landscape bench/landscape.csv] [--seeds 30] [--trials 40]
    python bench/search_efficiency.py --scenarios [--landscape bench/landscape-scenarios.csv]
        [--spec search-spaces/local-scenarios.yaml] [--seeds 30] [--trials 40]

Scenario mode (``--scenarios``): the landscape ``bench/record_landscape.py --scenarios`` recorded
(per config, per scenario of the scenario spec), replayed by ``ScenarioGrid.landscape``: each
proposal is answered by its nearest recorded config over the spec's search space with the
resilience knobs (``bench/_scenario_space.py``; numeric knobs scaled to their range, log where
the parameter is log, categorical ones and an unset CPU limit adding 1 when they differ), each
scenario's load run by that scenario's recorded figures, each window varied by the recorded
window spread (seeded). The study is the spec's: its objectives (e.g. steady p95, surge goodput
within the SLO, failing error rate, CPU limit), its per-scenario constraints, its windows, noise
control and early abort; no drift checks, no confirmation. The hypervolume is over the spec's
objectives (maximized ones negated) of the recorded, noise-free values of the feasible configs
tried, against a reference point at the nadir of the landscape's feasible configs pushed out by
10 % of each objective's range; normalized by the hypervolume of all the landscape's feasible
configs.

Grid mode (the default, ``bench/landscape.csv``):

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
never; and how many seeds reached it), each with a bootstrap 90 % interval of the median (over
seeds, 5,000 resamples), and the difference of each sampler's median trials to 95 % from random
search's with its bootstrap interval. Samplers: tpe, nsga2, random, and gp when torch imports.
The table is printed and written to bench/RESULTS.md under "## Search efficiency (recorded
landscape)" (``--scenarios``: "## Search efficiency (scenario landscape)"), replacing that
section and keeping the others (--no-write to skip). Studies run in a temporary directory (in
/dev/shm when there is one: SQLite's syncs are most of a replayed trial's time).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume

import autotune.study._loop as loop
from _results import machine, replace_section
from _scenario_space import scenario_space_spec
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec, load_spec
from autotune.study import TrialRecord, make_sampler, objective_values, run_study, violations
from autotune.testing.replay import GRID_COLUMNS, Landscape, RecordedGrid, ReplayDriver, ReplayTarget
from autotune.testing.scenario_grid import ScenarioGrid

#: Samplers only the bench offers, to compare with ``make_sampler``'s (by name, built per seed):
#: ``tpe-univariate`` is Optuna's default TPE (each knob modelled on its own), what ``tpe`` was
#: in effect before ``group=True``.
BENCH_SAMPLERS: dict[str, Callable[[int | None, int], optuna.samplers.BaseSampler]] = {
    "tpe-univariate": lambda seed, startup: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
}
SECTION = "## Search efficiency (recorded landscape)"
SCENARIO_SECTION = "## Search efficiency (scenario landscape)"
CHECKPOINTS = (10, 20, 30, 40)
THRESHOLDS = (0.90, 0.95)
REF_CPU = 2.2
#: Bootstrap resamples of the seeds for each interval, and the interval's coverage.
RESAMPLES = 5000
COVERAGE = 0.90


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

    def curve(self, configs: Sequence[MeshConfig]) -> tuple[list[float], int]:
        """Normalized hypervolume after each config tried, and how many Pareto-optimal points it tried."""
        keys = [self.key(c) for c in configs]
        found: list[tuple[float, float]] = []
        curve: list[float] = []
        for key in keys:
            point = self.points[key]
            if point.feasible:
                found.append((point.p95, point.cpu))
            curve.append(hypervolume(found, self.ref) / self.best_hv)
        return curve, len(set(keys) & self.front)


class ScenarioFront:
    """A scenario landscape's truth for the spec's objectives: each recorded config's objective
    values (to minimize: maximized ones negated), whether it is feasible by the spec's
    constraints, the reference point and the best hypervolume."""

    def __init__(self, grid: ScenarioGrid, spec: StudySpec, margin: float = 0.1) -> None:
        self.grid = grid
        scenarios = spec.scenario_list()
        signs = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in spec.objectives])
        self.values: list[np.ndarray | None] = []
        for metrics, fail in zip(grid.metrics, grid.fails, strict=True):
            try:
                values = np.array(objective_values(spec.objectives, metrics, scenarios[0].name)) * signs
            except ValueError:
                values = None
            ok = fail is None and values is not None and not violations(scenarios, metrics)
            self.values.append(values if ok else None)
        feasible = [v for v in self.values if v is not None]
        if len(feasible) < 2:
            raise SystemExit("the landscape has fewer than 2 feasible configs; nothing to compare against")
        stack = np.vstack(feasible)
        low, high = stack.min(axis=0), stack.max(axis=0)
        span = np.where(high > low, high - low, np.maximum(np.abs(high), 1e-9))
        self.ref = high + margin * span
        self.front = {i for i, v in enumerate(self.values) if v is not None and not any(
            w is not None and bool(np.all(w <= v)) and bool(np.any(w < v)) for w in self.values)}
        self.best_hv = self.hv(set(range(len(self.values))))
        self._cache: dict[frozenset[int], float] = {}

    def hv(self, rows: set[int]) -> float:
        """Hypervolume of the feasible configs among ``rows`` (0 when there is none)."""
        points = [self.values[i] for i in sorted(rows) if self.values[i] is not None]
        if not points:
            return 0.0
        return float(compute_hypervolume(np.vstack(points), self.ref))  # type: ignore[arg-type]

    def curve(self, configs: Sequence[MeshConfig]) -> tuple[list[float], int]:
        """Normalized hypervolume after each config tried, and how many Pareto-optimal configs it tried."""
        rows = [self.grid.nearest(c) for c in configs]
        seen: set[int] = set()
        curve: list[float] = []
        for i in rows:
            seen.add(i)
            key = frozenset(j for j in seen if self.values[j] is not None)
            if key not in self._cache:
                self._cache[key] = self.hv(set(key)) / self.best_hv
            curve.append(self._cache[key])
        return curve, len(seen & self.front)


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


def replay_spec(spec: StudySpec, sampler: str, seed: int, trials: int, tmp: str,
                parameters: dict[str, dict[str, object]] | None = None) -> StudySpec:
    """The spec's study as replayed in ``tmp``: no drift checks, no confirmation; ``parameters``
    (the grid's space, one window per trial) replaces the spec's search space when given."""
    changes: dict[str, object] = {
        "study.name": f"replay-{sampler}-{seed}", "study.storage": f"sqlite:///{tmp}/replay.db",
        "study.results_dir": f"{tmp}/results", "study.sampler": sampler, "study.seed": seed,
        "study.trials": trials, "measurement.drift_every": 0, "measurement.confirm_rounds": 0}
    if parameters is not None:
        changes.update({"parameters": parameters, "measurement.repeats": 1, "measurement.max_repeats": 1})
    return spec.with_overrides(**changes)


def run_replay(spec: StudySpec, land: Landscape) -> list[MeshConfig]:
    """One study through ``run_study`` on the replayed landscape: the configs of its trials, in order."""
    study = run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))
    return [TrialRecord.read(t).config for t in study.get_trials(deepcopy=False)
            if not TrialRecord.read(t).drift_check]


@dataclass(frozen=True)
class Replay:
    """How to replay one study (picklable, for worker processes): the landscape CSV, the spec,
    the trials, and in grid mode the grid's parameters."""

    scenarios: bool
    landscape: Path
    spec_path: str
    trials: int
    parameters: dict[str, dict[str, object]] | None = None

    def __call__(self, sampler: str, seed: int) -> tuple[list[MeshConfig], float]:
        """The configs one study of ``sampler`` with ``seed`` tried, and its wall time."""
        t0 = time.monotonic()
        variant = BENCH_SAMPLERS.get(sampler)
        if variant is not None:  # a bench-only sampler: the study loop builds it instead of make_sampler's
            sampler = "tpe"
            loop.make_sampler = lambda _name, seed, n_startup_trials=5: variant(seed, n_startup_trials)
        else:
            loop.make_sampler = make_sampler
        with tempfile.TemporaryDirectory(prefix="autotune-replay-", dir=_tmpdir()) as tmp:
            if self.scenarios:
                spec = scenario_space_spec(self.spec_path)
                land = ScenarioGrid.read(self.landscape, spec).landscape(seed=seed)
            else:
                spec = load_spec(self.spec_path)
                land = Landscape.from_csv(self.landscape, seed=seed)
            configs = run_replay(replay_spec(spec, sampler, seed, self.trials, tmp, self.parameters), land)
        return configs, time.monotonic() - t0


def _quiet() -> None:
    """Keep a (worker) process's logs to errors: failed configs are data here."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    logging.getLogger("autotune").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def first_reaching(curve: list[float], threshold: float) -> float:
    """1-based trial at which the curve first reaches ``threshold`` (inf if never)."""
    for i, v in enumerate(curve, 1):
        if v >= threshold - 1e-12:
            return float(i)
    return math.inf


def bootstrap(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """A bootstrap ``COVERAGE`` interval of the median of ``values`` (percentiles, without
    interpolation, of the medians of ``RESAMPLES`` resamples; inf values — never reached — are
    kept, so a bound may be inf)."""
    arr = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, arr.size, size=(RESAMPLES, arr.size))
    tail = (1 - COVERAGE) / 2
    lo, hi = np.quantile(np.median(arr[idx], axis=1), [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def _trials(value: float, trials: int) -> str:
    return f"{value:g}" if math.isfinite(value) else f">{trials}"


def summarize(curves: dict[str, list[list[float]]], fronts: dict[str, list[int]], front_size: int,
              trials: int) -> pd.DataFrame:
    """Per sampler: median HV@n and trials to each threshold over seeds, with bootstrap intervals."""
    rows = []
    for name, runs in curves.items():
        row: dict[str, object] = {"sampler": name, "seeds": len(runs)}
        for n in CHECKPOINTS:
            if n <= trials:
                at = [r[n - 1] for r in runs]
                lo, hi = bootstrap(at)
                row[f"HV@{n}"] = f"{statistics.median(at):.3f} [{lo:.3f}, {hi:.3f}]"
        for th in THRESHOLDS:
            hits = [first_reaching(r, th) for r in runs]
            med = float(np.median(hits))
            lo, hi = bootstrap(hits)
            reached = sum(math.isfinite(h) for h in hits)
            row[f"trials to {th:.0%}"] = (f"{_trials(med, trials)} [{_trials(lo, trials)}, "
                                          f"{_trials(hi, trials)}] ({reached}/{len(runs)})")
        row[f"front found @{trials}"] = f"{statistics.median(fronts[name]):g}/{front_size}"
        rows.append(row)
    return pd.DataFrame(rows)


def against_random(curves: dict[str, list[list[float]]], trials: int, threshold: float = 0.95) -> list[str]:
    """Each sampler against random search: the difference of the medians of its trials to
    ``threshold`` (never reached counts as ``trials + 1``) and of its hypervolume after the last
    checkpoint, each with a bootstrap interval (seeds resampled independently per sampler)."""
    if "random" not in curves:
        return []
    last = max(n for n in (*CHECKPOINTS, trials) if n <= trials)
    tail = (1 - COVERAGE) / 2
    out = []
    for name, runs in curves.items():
        if name == "random":
            continue
        rng = np.random.default_rng(1)
        parts = []
        for label, stat in ((f"median trials to {threshold:.0%}",
                             lambda r: min(first_reaching(r, threshold), trials + 1)),
                            (f"median HV@{last}", lambda r: r[last - 1])):
            mine = np.array([stat(r) for r in runs])
            base = np.array([stat(r) for r in curves["random"]])
            diff = (np.median(mine[rng.integers(0, mine.size, (RESAMPLES, mine.size))], axis=1)
                    - np.median(base[rng.integers(0, base.size, (RESAMPLES, base.size))], axis=1))
            lo, hi = np.quantile(diff, [tail, 1 - tail])
            parts.append(f"{label} {float(np.median(mine) - np.median(base)):+.3g} [{lo:+.3g}, {hi:+.3g}]")
        out.append(f"{name} − random: " + "; ".join(parts)
                   + f" ({COVERAGE:.0%} bootstrap; never reached counted as {trials + 1})")
    return out


def _tmpdir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", action="store_true", help="the scenario landscape (see above)")
    parser.add_argument("--landscape", type=Path, default=None,
                        help="default bench/landscape.csv, with --scenarios bench/landscape-scenarios.csv")
    parser.add_argument("--spec", default=None, help="objectives and constraints (default "
                        "search-spaces/local-demo.yaml, with --scenarios search-spaces/local-scenarios.yaml)")
    parser.add_argument("--samplers", default="tpe,nsga2,random,gp",
                        help="comma-separated; gp only if torch imports; also " + ", ".join(BENCH_SAMPLERS))
    parser.add_argument("--seeds", type=int, default=30, help="seeds 0..N-1 per sampler")
    parser.add_argument("--trials", type=int, default=40, help="trials per study (the baseline counts)")
    parser.add_argument("--ref-factor", type=float, default=2.0,
                        help="grid mode: reference p95 = this x the best feasible p95 of the landscape")
    parser.add_argument("--jobs", type=int, default=1, help="studies replayed at once (processes)")
    parser.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.scenarios:
        args.landscape = args.landscape or Path("bench/landscape-scenarios.csv")
        args.spec = args.spec or "search-spaces/local-scenarios.yaml"
    else:
        args.landscape = args.landscape or Path("bench/landscape.csv")
        args.spec = args.spec or "search-spaces/local-demo.yaml"

    _quiet()
    notes: list[str] = []
    if args.scenarios:
        spec = scenario_space_spec(args.spec)
        sgrid = ScenarioGrid.read(args.landscape, spec)
        truth: Grid | ScenarioFront = ScenarioFront(sgrid, spec)
        section = SCENARIO_SECTION
        feasible = sum(v is not None for v in truth.values)
        failed = sum(f is not None for f in sgrid.fails)
        notes.append(
            f"landscape: {args.landscape} ({len(sgrid.configs)} configs, {feasible} feasible, {failed} failed), "
            f"spec {args.spec} ({', '.join(s.name for s in spec.scenario_list())}) with "
            f"{len(spec.search_space())} parameters ({', '.join(p.name for p in spec.search_space())}); objectives "
            + ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives)
            + f"; reference point {', '.join(f'{v:.4g}' for v in truth.ref)} (maximized objectives negated); "
            f"best hypervolume {truth.best_hv:.4g}")
        front_text = ", ".join(f"#{i}" for i in sorted(truth.front))
        replay = Replay(True, args.landscape, args.spec, args.trials)
    else:
        spec = load_spec(args.spec)
        frame = pd.read_csv(args.landscape)
        grid = Grid(RecordedGrid.read(args.landscape), args.ref_factor)
        truth = grid
        section = SECTION
        grid_size = math.prod(len(v) for v in grid.values.values())
        if len(frame) < grid_size:
            raise SystemExit(f"{args.landscape} holds {len(frame)} of {grid_size} grid configs; "
                             "finish bench/record_landscape.py first")
        notes.append(f"landscape: {args.landscape} ({len(frame)} of {grid_size} grid configs, "
                     f"{sum(p.feasible for p in grid.points.values())} feasible, "
                     f"{sum(p.failed for p in grid.points.values())} failed); "
                     f"reference point ({grid.ref[0]:.2f} ms, {grid.ref[1]:g} cores); "
                     f"best hypervolume {grid.best_hv:.3f}")
        front_text = ", ".join(f"{grid.points[k].p95:.2f} ms @ {grid.points[k].cpu:g} cores"
                               for k in sorted(grid.front, key=lambda k: grid.points[k].cpu))
        replay = Replay(False, args.landscape, args.spec, args.trials, grid.parameters())

    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if "gp" in names:
        try:
            import torch  # noqa: F401
        except ImportError:
            names.remove("gp")
            notes.append("gp: skipped, torch does not import (pip install torch==2.13.0 for the CPU build)")
    curves: dict[str, list[list[float]]] = {name: [] for name in names}
    fronts: dict[str, list[int]] = {name: [] for name in names}
    seconds: dict[str, float] = dict.fromkeys(names, 0.0)
    tasks = [(name, seed) for name in names for seed in range(args.seeds)]
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_quiet) as pool:
        runs = pool.map(replay, [n for n, _ in tasks], [s for _, s in tasks])
        for (name, seed), (configs, wall) in zip(tasks, runs, strict=True):
            curve, found = truth.curve(configs)
            curves[name].append(curve)
            fronts[name].append(found)
            seconds[name] += wall
            if seed == args.seeds - 1:
                print(f"{name}: {args.seeds} seeds x {args.trials} trials, {seconds[name]:.1f}s "
                      f"({time.monotonic() - t0:.0f}s elapsed)", file=sys.stderr)
    table = summarize(curves, fronts, len(truth.front), args.trials).to_markdown(index=False)
    command = "python bench/search_efficiency.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    body = "\n".join([
        f"Machine: {machine()}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        f"Command: `{command}`.",
        "",
        *(f"- {n}" for n in notes),
        f"- HV@n: median over seeds 0..{args.seeds - 1} of the hypervolume of the feasible front "
        "(recorded values of the configs tried) after n trials / the whole landscape's, with a "
        f"bootstrap {COVERAGE:.0%} interval of the median; trials to x%: median over seeds [interval], "
        f">{args.trials} = not reached (seeds that reached it); the first trial is the Istio-default "
        "baseline; each study is `run_study` on the replay target and driver",
        f"- the Istio-default baseline (trial 1) alone holds {truth.curve([MeshConfig()])[0][0]:.3f} of the "
        "best hypervolume",
        f"- front found: median over seeds of how many of the landscape's {len(truth.front)} Pareto-optimal "
        f"configs ({front_text}) the study tried",
        *(f"- {line}" for line in against_random(curves, args.trials)),
        *(f"- {name}'s studies have exactly random search's hypervolume curves, seed for seed: it "
          "proposed random search's configs (the Istio-default baseline trial has no parameters, "
          "so Optuna's intersection search space is empty and the sampler samples independently)"
          for name in curves if name != "random" and curves[name] == curves.get("random")),
        "- replay time per sampler (sum over its studies): " + ", ".join(f"{n} {s:.1f}s" for n, s in seconds.items()),
        "",
        table,
    ])
    print(body)
    if not args.no_write:
        replace_section(args.results, section, body)
        print(f"\nwritten to {args.results} under {section!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
