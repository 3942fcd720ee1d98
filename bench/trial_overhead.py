"""Wall time per trial against its load window, from a recorded study.

    python bench/trial_overhead.py STUDY_NAME [--storage sqlite:///trials/autotune.db]

Prints, per completed trial, the time spent applying the config (Envoy restart), waiting until
ready, running the load (Locust start-up, warm-up, window, shutdown) and in total, and the
overhead: total / (warm-up + window) - 1. Reads the timings each trial recorded; runs nothing.
"""

from __future__ import annotations

import argparse

import optuna
import pandas as pd
from optuna.trial import TrialState

from autotune.storage import make_storage


def overhead_table(study: optuna.Study) -> pd.DataFrame:
    """One row per completed trial plus a median row; seconds, and overhead in % of the window."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        tm = t.user_attrs.get("timings") or {}
        if not tm:
            continue
        rows.append({"trial": t.number, "apply_s": tm["apply_s"], "ready_s": tm["ready_s"],
                     "load_s": tm["load_s"], "total_s": tm["total_s"], "window_s": tm["window_s"]})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["overhead_pct"] = 100 * (frame["total_s"] / frame["window_s"] - 1)
    median = frame.median(numeric_only=True).to_frame().T
    median["trial"] = "median"
    return pd.concat([frame, median], ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study")
    parser.add_argument("--storage", default="sqlite:///trials/autotune.db")
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study, storage=make_storage(args.storage))
    print(overhead_table(study).round(2).to_markdown(index=False))


if __name__ == "__main__":
    main()
