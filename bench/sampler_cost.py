"""Milliseconds each sampler spends proposing one config, against the number of finished trials.

    python bench/sampler_cost.py [--sizes 50,200,1000] [--asks 20] [--samplers tpe,nsga2,random,gp]

For every sampler (``autotune.samplers.make_sampler(name, seed)``: tpe, nsga2, random, and gp when
torch imports) and every size N, an in-memory study with the demo spec's two objectives is
pre-filled with N completed trials (``study.add_trials`` of ``optuna.trial.create_trial``): random
params in the demo's five-parameter space (log-uniform where the spec says log), two random
objective values, and the two constraints passed as ``constraints=`` (about 30 % of the trials
infeasible). NSGA-II's trials also carry their generation (population 5, as make_sampler builds it).
Then it times --asks (20) proposals: ``study.ask()`` plus the study's own ``suggest`` of the five
parameters, each told back COMPLETE with random values, so the study holds N..N+asks-1 trials
while timing; a cell stops early once its asks took --budget (60) seconds, after at least 3 (GP at
1000 trials takes ~20-40 s per ask on 2 cores). The table gives the median and the slowest ask in
milliseconds (NSGA-II does its selection once per generation, which shows in the max). It is printed and written to
bench/RESULTS.md under "## Sampler cost", replacing that section and keeping the others
(--no-write to skip).
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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial

from _results import machine, replace_section
from autotune.spec import SearchParam, StudySpec, load_spec
from autotune.study import CONSTRAINT_NAMES, make_sampler, suggest

SECTION = "## Sampler cost"
POPULATION = 5  # make_sampler's NSGA-II population with the default n_startup_trials


def distributions(space: list[SearchParam]) -> dict[str, BaseDistribution]:
    """The distributions ``autotune.study.suggest`` registers for the space."""
    out: dict[str, BaseDistribution] = {}
    for p in space:
        if p.info.kind == "cpu":
            out[p.name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        else:
            step = int(p.step) if p.step else 1
            out[p.name] = IntDistribution(int(p.low), int(p.high), log=p.log, step=step)
    return out


def random_params(dists: dict[str, BaseDistribution], rng: np.random.Generator) -> dict[str, float]:
    """One random point of the space (log-uniform for log distributions)."""
    out: dict[str, float] = {}
    for name, d in dists.items():
        if isinstance(d, FloatDistribution):
            out[name] = float(np.exp(rng.uniform(np.log(d.low), np.log(d.high))) if d.log
                              else rng.uniform(d.low, d.high))
        elif isinstance(d, IntDistribution):
            if d.log:
                v = round(float(np.exp(rng.uniform(np.log(d.low - 0.5), np.log(d.high + 0.5)))))
            else:
                v = int(rng.integers(d.low, d.high + 1))
            out[name] = min(max(v, d.low), d.high)
    return out


def random_outcome(rng: np.random.Generator) -> tuple[list[float], dict[str, float]]:
    """Two objective values (p95 ms, CPU cores) and the constraints, ~30 % infeasible."""
    values = [float(rng.uniform(5.0, 100.0)), float(rng.uniform(0.02, 2.0))]
    infeasible = rng.random() < 0.3
    constraints = {name: float(rng.uniform(-0.05, 0.0)) for name in CONSTRAINT_NAMES}
    if infeasible:
        constraints[str(rng.choice(CONSTRAINT_NAMES))] = float(rng.uniform(0.001, 0.5))
    return values, constraints


def prefilled_study(spec: StudySpec, sampler_name: str, size: int, seed: int) -> optuna.Study:
    """An in-memory study with ``size`` completed random trials."""
    sampler = make_sampler(sampler_name, seed)
    study = optuna.create_study(directions=[o.direction for o in spec.objectives], sampler=sampler)
    dists = distributions(spec.search_space())
    rng = np.random.default_rng(seed)
    generation_key = f"{type(sampler).__name__}:generation"
    trials: list[FrozenTrial] = []
    for i in range(size):
        values, constraints = random_outcome(rng)
        system_attrs = {generation_key: i // POPULATION} if sampler_name == "nsga2" else None
        trials.append(optuna.trial.create_trial(
            params=random_params(dists, rng), distributions=dists, values=values,
            constraints=constraints, system_attrs=system_attrs))
    study.add_trials(trials)
    return study


def time_asks(spec: StudySpec, sampler_name: str, size: int, asks: int, seed: int,
              budget_s: float = math.inf) -> list[float]:
    """Milliseconds of each of ``asks`` proposals (ask + suggest of the demo's parameters); stops
    early, after at least 3, once the asks took ``budget_s`` seconds together."""
    study = prefilled_study(spec, sampler_name, size, seed)
    space = spec.search_space()
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(asks):
        t0 = time.perf_counter()
        trial = study.ask()
        suggest(trial, space)
        out.append(1000 * (time.perf_counter() - t0))
        if len(out) >= 3 and sum(out) >= 1000 * budget_s:
            break
        values, constraints = random_outcome(rng)
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        study.tell(trial, values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml", help="the space and objectives")
    parser.add_argument("--samplers", default="tpe,nsga2,random,gp", help="comma-separated; gp only if torch imports")
    parser.add_argument("--sizes", default="50,200,1000", help="completed trials before timing")
    parser.add_argument("--asks", type=int, default=20, help="proposals timed per sampler and size")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of asking per cell; past it (and after 3 asks) a cell stops early")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = load_spec(args.spec)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    notes = []
    if "gp" in names:
        try:
            import torch
        except ImportError:
            names.remove("gp")
            notes.append("gp: skipped, torch does not import (pip install torch==2.13.0 for the CPU build)")
        else:
            notes.append(f"gp: torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in names:
        row: dict[str, object] = {"sampler": name}
        for size in sizes:
            t0 = time.monotonic()
            ms = time_asks(spec, name, size, args.asks, args.seed, args.budget)
            few = f" ({len(ms)} asks)" if len(ms) < args.asks else ""
            row[f"median ms @{size}"] = f"{statistics.median(ms):.2f}{few}"
            row[f"max ms @{size}"] = f"{max(ms):.2f}"
            print(f"{name} @{size}: median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms "
                  f"({time.monotonic() - t0:.1f}s with the pre-fill)", file=sys.stderr)
        rows.append(row)
    table = pd.DataFrame(rows).to_markdown(index=False)
    command = "python bench/sampler_cost.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    body = "\n".join([
        f"Machine: {machine()}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Command: `{command}`.",
        "",
        f"- one ask = `study.ask()` + `suggest` of the {len(spec.search_space())} demo parameters "
        f"({args.spec}), in-memory storage, {args.asks} asks per cell told back COMPLETE "
        f"(the study holds N..N+asks-1 trials); median and slowest ask; a cell stops after "
        f"{args.budget:g} s of asking (at least 3 asks), the number of asks is then shown",
        "- pre-filled trials: random params, random objectives, constraints via "
        "`create_trial(constraints=...)`, ~30 % infeasible",
        *(f"- {n}" for n in notes),
        "",
        table,
    ])
    print(body)
    if not args.no_write:
        replace_section(args.results, SECTION, body)
        print(f"\nwritten to {args.results} under {SECTION!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
