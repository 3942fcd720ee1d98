"""Confirmation: re-measure the Pareto configs against the baseline, interleaved, with intervals.

A study's Pareto front is built from single (noisy) measurements, so it promises more than it may
hold. After the search, each Pareto config B and the baseline A are measured again in rounds
(A B1 B2 … per round, the order of the Bs reversed every other round); round r's B is compared with
round r's A, which cancels slow drift of the machine. A config is *confirmed* when it stayed
feasible in every round and at least one objective improved with the whole confidence interval on
the better side. The intervals of the other objectives are reported, so a trade-off is visible.

What is measured is each Pareto config's *minimal* config: its knobs with no detected effect
(the study's stored ``KnobEffects``, see ``_effects``) put back to Istio's default, which is
what the export writes; each result names the knobs reset. Without stored verdicts, or when no
knob is reset, it is the trial's config as searched.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import optuna
from optuna.trial import FrozenTrial

from autotune.errors import AutotuneError, TrialFailed
from autotune.load import LoadDriver
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study._effects import minimal_config
from autotune.study._front import best_first, pareto_trials
from autotune.study._measure import default_driver, measure_config
from autotune.study._objectives import lookup, violations
from autotune.study._progress import NullObserver, Observer
from autotune.study._record import (
    Confirmation,
    ConfirmedConfig,
    ObjectiveChange,
    TrialRecord,
    confirmation_of,
    knob_effects_of,
    set_confirmation,
)
from autotune.study._stats import paired_change
from autotune.targets import Target

logger = logging.getLogger(__name__)


def candidates(study: optuna.Study, spec: StudySpec) -> list[FrozenTrial]:
    """The Pareto configs to confirm (not the baseline itself), at most
    ``measurement.confirmMaxConfigs``: the best of each objective in turn (first objective's,
    second's, …, then the runner-up of each, …), so a confirmation smaller than the front covers
    its trade-offs instead of the configs that differ only by noise on the first objective.
    Returned in front order (best first objective first)."""
    front = [t for t in pareto_trials(study) if not TrialRecord.read(t).baseline]
    limit = spec.measurement.confirm_max_configs
    if len(front) <= limit:
        return front
    rankings = [best_first(front, study.directions, i) for i in range(len(study.directions))]
    chosen: list[int] = []
    for rank in range(len(front)):  # the rank-th best of each objective, round by round
        for ranking in rankings:
            if len(chosen) < limit and ranking[rank].number not in chosen:
                chosen.append(ranking[rank].number)
    return [t for t in front if t.number in chosen]



def confirm_front(study: optuna.Study, spec: StudySpec, target: Target,
                  observer: Observer | None = None, *,
                  load: LoadDriver | None = None) -> Confirmation | None:
    """Run the confirmation rounds on a started target under ``load`` (default: Locust with the
    spec's locustfile) and store the result on the study. Each Pareto config is measured as its
    minimal config (see the module docstring). Skipped, returning the stored result, when the same
    front was already confirmed with as many rounds and the same knobs reset. Returns ``None``
    when there is nothing to confirm."""
    obs = observer or NullObserver()
    driver = load or default_driver(spec)
    rounds = spec.measurement.confirm_rounds
    front = candidates(study, spec)
    if rounds == 0 or not front:
        return None
    key = [t.number for t in front]
    effects = knob_effects_of(study)
    minimal = {t.number: minimal_config(TrialRecord.read(t).config, effects) for t in front}
    resets = {n: reset for n, (_, reset) in minimal.items()}
    previous = confirmation_of(study)
    if (previous and previous.trials == key and previous.rounds == rounds
            and all(previous.results[n].reset == resets[n] for n in key if n in previous.results)):
        return previous
    metrics: list[str] = [o.metric for o in spec.objectives]
    runs: dict[str, list[dict[str, float] | None]] = {label: [] for label in ["baseline", *map(str, key)]}
    total = rounds * (len(front) + 1)
    step = 0
    configs = [(str(n), minimal[n][0]) for n in key]
    for n in key:
        if resets[n]:
            logger.info("confirming trial %d as its minimal config %s (back to Istio's default, no "
                        "detected effect: %s)", n, minimal[n][0].describe(), ", ".join(resets[n]))
    for r in range(rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for label, config in [("baseline", MeshConfig()), *order]:
            step += 1
            obs.trial_started(int(label) if label != "baseline" else -1, step, total, config,
                              label == "baseline", stage="confirm")
            runs[label].append(_measure(target, spec, config, obs, driver))
    result = _evaluate(spec, key, runs, metrics, resets)
    set_confirmation(study, result)
    return result


def _measure(target: Target, spec: StudySpec, config: MeshConfig, obs: Observer,
             load: LoadDriver) -> dict[str, float] | None:
    """One window of one config; ``None`` (and the baseline restored) if it failed."""
    try:
        return measure_config(target, spec, config, obs, repeats=1, load=load, early_abort=False).metrics
    except TrialFailed as exc:
        logger.warning("confirmation run of %s failed: %s", config.describe(), exc)
        try:
            target.restore()
        except AutotuneError as err:
            logger.error("could not restore the baseline: %s", err)
        return None


def _evaluate(spec: StudySpec, key: list[int], runs: dict[str, list[dict[str, float] | None]],
              metrics: list[str], resets: dict[int, list[str]] | None = None) -> Confirmation:
    """The confirmation of the configs ``key`` from their runs and the baseline's (by label, one
    entry per round, ``None`` for a failed run); ``resets``: the knobs each measured config had
    put back to Istio's default."""
    base_runs = runs["baseline"]
    results = {number: replace(_decide(spec, number, base_runs, runs[str(number)], metrics),
                               reset=list((resets or {}).get(number, [])))
               for number in key}
    first = spec.scenario_list()[0].name
    baseline = {m: [lookup(r, m, first) if r else None for r in base_runs] for m in metrics}
    return Confirmation(trials=list(key), rounds=len(base_runs), confidence=spec.measurement.confidence,
                        baseline=baseline, results=results)


def _decide(spec: StudySpec, number: int, base_runs: list[dict[str, float] | None],
            cand: list[dict[str, float] | None], metrics: list[str]) -> ConfirmedConfig:
    """One config's result: its change per objective over the rounds where both it and the
    baseline were measured, and whether that confirms it."""
    directions: dict[str, str] = {o.metric: o.direction for o in spec.objectives}
    pairs = [(a, b) for a, b in zip(base_runs, cand, strict=True) if a is not None and b is not None]
    infeasible = sum(1 for b in cand if b is None or violations(spec.scenario_list(), b))
    changes: dict[str, ObjectiveChange] = {}
    improved = False
    for m in metrics:
        if len(pairs) < 2:
            continue
        first = spec.scenario_list()[0].name
        change = paired_change([lookup(a, m, first) for a, _ in pairs],
                               [lookup(b, m, first) for _, b in pairs], spec.measurement.confidence)
        changes[m] = ObjectiveChange(round(change.mean_pct, 2), round(change.low_pct, 2),
                                     round(change.high_pct, 2))
        improved = improved or change.improves(directions[m])
    reason: str | None = None
    if infeasible:
        reason = f"infeasible or failed in {infeasible} of {len(cand)} rounds"
    elif len(pairs) < 2:
        reason = "fewer than 2 paired rounds"
    elif not improved:
        reason = "no objective improved beyond its confidence interval"
    logger.info("confirmation of trial %d: %s", number, reason or "confirmed")
    return ConfirmedConfig(trial=number, rounds=len(pairs), infeasible_rounds=infeasible,
                           changes=changes, confirmed=reason is None, reason=reason)
