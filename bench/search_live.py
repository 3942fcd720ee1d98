"""Search efficiency on a short live run: TPE against random search on the real local target.

    python bench/search_live.py [--samplers tpe,random] [--seeds 2] [--trials 12]

Runs the demo spec's study (its 5 parameters, p95 against the CPU limit, its constraints) per
sampler and seed with short trials (2 s warm-up, one 4 s window, no drift checks or confirmation),
then computes after each trial the hypervolume of the feasible front of the measured values,
with the reference point (2 x the best feasible p95 seen in any run, 2.2 cores), normalized by the
hypervolume of all runs' feasible trials together (the best front known). Live measurements are
noisy and the budget is small: read this beside the recorded-landscape replay, not instead of it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import optuna
import pandas as pd

from _results import write_section
from autotune.spec import load_spec
from autotune.study import TrialRecord, run_study
from search_efficiency import REF_CPU, hypervolume


def points(study: optuna.Study) -> list[tuple[float, float] | None]:
    """Per trial in order: (p95, CPU limit) if it completed feasibly, else None."""
    out: list[tuple[float, float] | None] = []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.read(t)  # feasible: completed, within every constraint
        out.append((rec.metrics["latency_p95_ms"], rec.metrics["cpu_reserved_cores"]) if rec.feasible else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", default="tpe,random")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    spec = load_spec("search-spaces/local-demo.yaml")
    runs: dict[str, list[list[tuple[float, float] | None]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.samplers.split(","):
            for seed in range(args.seeds):
                s = spec.with_overrides(**{
                    "study.name": f"live-{name}-{seed}", "study.storage": f"sqlite:///{tmp}/live.db",
                    "study.sampler": name, "study.seed": seed, "study.trials": args.trials,
                    "study.results_dir": str(Path(tmp) / "out"), "timing.warmup": 2, "timing.window": 4,
                    "measurement.repeats": 1, "measurement.max_repeats": 1, "measurement.drift_every": 0,
                    "measurement.confirm_rounds": 0})
                runs.setdefault(name, []).append(points(run_study(s)))
                print(f"{name} seed {seed}: done", flush=True)
    every = [p for rs in runs.values() for r in rs for p in r if p]
    ref = (2 * min(p for p, _ in every), REF_CPU)
    best = hypervolume(every, ref)
    checkpoints = sorted({max(1, args.trials // 2), args.trials})
    rows = []
    for name, rs in runs.items():
        row: dict[str, object] = {"sampler": name, "seeds": len(rs)}
        for n in checkpoints:
            hv = [hypervolume([p for p in r[:n] if p], ref) / best for r in rs]
            row[f"HV@{n}"] = round(statistics.median(hv), 3)
        row["feasible trials"] = statistics.median(sum(p is not None for p in r) for r in rs)
        rows.append(row)
    table = pd.DataFrame(rows).to_markdown(index=False)
    print(table)
    write_section("Search efficiency (short live run)", f"""
Demo spec, {args.trials} trials per study (the baseline is trial 0), 2 s warm-up + one 4 s window;
reference point ({ref[0]:.2f} ms, {ref[1]:g} cores); HV normalized by all runs' feasible trials together.

{table}
""")


if __name__ == "__main__":
    main()
