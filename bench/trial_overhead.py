"""Wall time per trial against its load window, broken into phases, per sampler.

    python bench/trial_overhead.py --live [--samplers tpe,nsga2,random] [--trials 8]
    python bench/trial_overhead.py --study local-demo    # from a recorded study's timings

``--live`` runs a short study per sampler on the local target (the demo spec's load, one 4 s
window after a 2 s warm-up, no confirmation) with an observer that timestamps every phase:
  sampler+storage: from the previous trial's end to this trial's start (tell, callbacks, ask,
                   suggest, writing the rendered manifests);
  apply:           Envoy restarted with the config;
  ready:           until it serves, plus Locust's start-up until its warm-up begins;
  warmup, measure: the load itself; "measure" also holds Locust's exit, aggregation and recording.
Overhead is everything but warm-up and window, in % of warm-up + window. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from _results import write_section
from autotune.mesh import MeshConfig
from autotune.spec import load_spec
from autotune.study import TrialOutcome, TrialRecord, make_storage, run_study


class Stopwatch:
    """An observer that records when each phase of each trial began."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def study_started(self, name: str, done: int, total: int) -> None:
        self.marks.append(("end", time.monotonic()))

    def trial_started(self, number: int, index: int, total: int, config: MeshConfig,
                      baseline: bool, stage: str = "trial") -> None:
        self.marks.append(("start", time.monotonic()))

    def phase(self, name: str, fraction: float) -> None:
        key = name.split(" ")[0]
        if not self.marks or self.marks[-1][0] != key:
            self.marks.append((key, time.monotonic()))

    def trial_finished(self, outcome: TrialOutcome, front: list[TrialOutcome]) -> None:
        self.marks.append(("end", time.monotonic()))

    def trials(self) -> list[dict[str, float]]:
        """Per trial, the seconds spent in each phase."""
        out, current, last_end = [], {}, None
        for i, (name, t) in enumerate(self.marks):
            nxt = self.marks[i + 1][1] if i + 1 < len(self.marks) else t
            if name == "end":
                if current:
                    out.append(current)
                current, last_end = {}, t
                continue
            if name == "start" and last_end is not None:
                current["sampler+storage"] = t - last_end
            current[name] = current.get(name, 0.0) + (nxt - t)
        return out


def live(samplers: list[str], trials: int) -> str:
    spec = load_spec("search-spaces/local-demo.yaml")
    rows = []
    for sampler in samplers:
        with tempfile.TemporaryDirectory() as tmp:
            s = spec.with_overrides(**{
                "study.name": f"overhead-{sampler}", "study.storage": f"sqlite:///{tmp}/o.db",
                "study.sampler": sampler, "study.trials": trials, "study.results_dir": str(Path(tmp) / "out"),
                "timing.warmup": 2, "timing.window": 4, "measurement.repeats": 1, "measurement.max_repeats": 1,
                "measurement.drift_every": 0, "measurement.confirm_rounds": 0})
            watch = Stopwatch()
            run_study(s, watch)
        phases = pd.DataFrame(watch.trials()).fillna(0.0)
        med = phases.median()
        window = 2 + 4
        total = float(phases.sum(axis=1).median())
        rows.append({"sampler": sampler, "trials": len(phases),
                     **{k: round(float(med.get(k, 0.0)), 3) for k in
                        ("sampler+storage", "apply", "ready", "warmup", "measure")},
                     "wall per trial s": round(total, 2), "window s": window,
                     "overhead %": round(100 * (total - window) / window, 1)})
    frame = pd.DataFrame(rows)
    return frame.to_markdown(index=False)


def recorded(study_name: str, storage: str) -> str:
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        tm = TrialRecord.read(t).timings
        if tm:
            rows.append({"trial": t.number, **{k: tm[k] for k in ("apply_s", "ready_s", "load_s", "total_s",
                                                                   "window_s")}})
    frame = pd.DataFrame(rows)
    frame["overhead_pct"] = 100 * (frame["total_s"] / frame["window_s"] - 1)
    med = frame.median(numeric_only=True).to_frame().T
    med["trial"] = "median"
    return pd.concat([frame, med], ignore_index=True).round(2).to_markdown(index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--live", action="store_true")
    parser.add_argument("--samplers", default="tpe,nsga2,random")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--study")
    parser.add_argument("--storage", default="sqlite:///trials/autotune.db")
    args = parser.parse_args()
    if args.live:
        table = live(args.samplers.split(","), args.trials)
        print(table)
        write_section("Trial overhead", f"Median seconds per phase over {args.trials} trials of a "
                      "2 s warm-up + one 4 s window (demo load).\n\n" + table)
    elif args.study:
        print(recorded(args.study, args.storage))
    else:
        parser.error("give --live or --study NAME")


if __name__ == "__main__":
    main()
