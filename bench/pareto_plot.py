"""The Pareto front of a recorded study as a PNG for bench/RESULTS.md.

    python bench/pareto_plot.py [--study local-demo] [--storage sqlite:///trials/autotune.db]

Plots every completed trial (p95 latency against the first CPU objective), feasible and
infeasible, the feasible Pareto front, the baseline, and which Pareto configs the confirmation
kept. Writes bench/pareto-front.png and a section of bench/RESULTS.md that shows it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.trial import TrialState

from _results import write_section
from autotune.export import pareto_frame
from autotune.study import (
    METRIC_LABELS,
    TrialRecord,
    confirmation_of,
    make_storage,
    pareto_trials,
    study_objectives,
)

OUT = Path(__file__).parent / "pareto-front.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="local-demo")
    parser.add_argument("--storage", default="sqlite:///trials/autotune.db")
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study, storage=make_storage(args.storage))
    y_metric, x_metric = (study_objectives(study) or [])[:2]
    done = {t.number: TrialRecord.read(t)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    front = {t.number for t in pareto_trials(study)}
    confirmation = confirmation_of(study)
    confirmed = confirmation.results if confirmation else {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for feasible, style in ((False, dict(c="#bbbbbb", marker="x", label="infeasible")),
                            (True, dict(c="#4c72b0", marker="o", label="feasible"))):
        pts = [r.metrics for r in done.values() if r.feasible == feasible]
        ax.scatter([m[x_metric] for m in pts], [m[y_metric] for m in pts], **style)
    line = sorted((n for n in done if n in front), key=lambda n: done[n].metrics[x_metric])
    ax.step([done[n].metrics[x_metric] for n in line], [done[n].metrics[y_metric] for n in line],
            where="post", c="#dd8452", label="Pareto front")
    for n in line:
        entry = confirmed.get(n)
        tag = "baseline" if done[n].baseline else f"#{n}" + (
            " ✓" if entry and entry.confirmed else " ✗" if entry else "")
        ax.annotate(tag, (done[n].metrics[x_metric], done[n].metrics[y_metric]), textcoords="offset points",
                    xytext=(5, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(METRIC_LABELS.get(x_metric, x_metric) + " (cores)")
    ax.set_ylabel(METRIC_LABELS.get(y_metric, y_metric))
    ax.set_title(f"{args.study}: {len(done)} completed trials, ✓ = confirmed against the baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT)
    table = pareto_frame(study)[["trial", "config", y_metric, x_metric, "confirmed",
                                 f"{y_metric}_ci_low_pct", f"{y_metric}_ci_high_pct"]].to_markdown(index=False)
    write_section("Pareto front of the demo study", f"![Pareto front]({OUT.name})\n\n{table}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
