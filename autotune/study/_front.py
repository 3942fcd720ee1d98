"""The study's queries about its own trials: the feasible Pareto front and the baseline measurements."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.study._record import TrialRecord, is_feasible


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible completed trials that no other feasible trial dominates, best first objective
    first (then trial number). Feasibility is the constraints each trial stored; baseline
    drift re-measurements are left out (they repeat trial 0's config)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values is not None and is_feasible(t) and not TrialRecord.read(t).drift_check]
    if not trials:
        return []
    values = np.array([t.values for t in trials], dtype=float) * np.array([_sign(d) for d in study.directions])
    front = []
    for i, v in enumerate(values):
        dominated = np.any(np.all(values <= v, axis=1) & np.any(values < v, axis=1))
        if not dominated:
            front.append(trials[i])
    return best_first(front, study.directions, 0)


def best_first(trials: list[FrozenTrial], directions: list[optuna.study.StudyDirection],
               objective: int) -> list[FrozenTrial]:
    """``trials`` (each with values) sorted best first on objective number ``objective`` (lowest
    when minimized, highest when maximized), then by trial number."""
    sign = _sign(directions[objective])
    return sorted(trials, key=lambda t: (sign * t.values[objective], t.number))


def _sign(direction: optuna.study.StudyDirection) -> float:
    return 1.0 if direction == optuna.study.StudyDirection.MINIMIZE else -1.0


def baseline_trial(study: optuna.Study, *, first: bool = False, near: int | None = None) -> FrozenTrial | None:
    """A completed Istio-default baseline measurement: the latest, the ``first``, or the one
    nearest to trial number ``near`` (what a trial is compared with, so drift cancels out)."""
    base = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if TrialRecord.read(t).baseline]
    if not base:
        return None
    if first:
        return base[0]
    if near is not None:
        return min(base, key=lambda t: (abs(t.number - near), t.number))
    return base[-1]
