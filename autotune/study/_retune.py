"""The scheduled job: each run re-checks the last recommendation, warm-starts a new search from
what is known, stops when the front stops moving, and says what changed.

``run_scheduled(spec)`` is what ``autotune study run-scheduled`` (the CronJob) calls. Each run is
a new study in the spec's storage (``_runs``): re-check (``_recheck``) → warm start (``_warm``) →
search with the flat-front stop (``_stop``; ``measurement.stopAfterFlat``, default
``DEFAULT_STOP_AFTER_FLAT``) → confirmation of the new front (``_confirm``) → the outcome:

- ``unchanged`` — the previous recommendation holds and no new confirmed config beats it beyond
  the intervals: it stays the recommendation;
- ``changed`` — there was none (the series' first run), it no longer holds (infeasible in a
  re-check round, no gain beyond its interval any more, or an objective moved against it), or a new
  confirmed config beats it on an objective beyond the intervals, by more than
  ``measurement.driftThreshold`` of its value, and is no worse beyond them on any other: the
  run's own recommendation (the confirmed Pareto config with the best first objective, else the
  Pareto config with the best first objective; Istio's defaults when only the baseline is on the
  front) replaces it;
- ``none-feasible`` — no config of this run was feasible and the previous recommendation does not
  hold: there is nothing to recommend.

When the previous run recommended Istio's defaults (only the baseline was feasible), they stay the
recommendation (``unchanged``) until a config of a run is confirmed better than them.

The outcome (with what moved, per objective, with intervals, and the recommendation's manifests)
is stored on the run (``retune.outcome``) for its report; ``Verdict.exit_code`` is the CLI's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import optuna
import pydantic

from autotune.load import LoadDriver
from autotune.mesh import MeshConfig, deployment_patch, destination_rule, to_yaml, virtual_service
from autotune.spec import StudySpec
from autotune.study._effects import minimal_config
from autotune.study._front import pareto_trials
from autotune.study._loop import open_study, run_study
from autotune.study._measure import default_driver
from autotune.study._objectives import metric_label
from autotune.study._progress import NullObserver, Observer
from autotune.study._recheck import Interval, Recheck, Recommendation, recheck, recheck_of
from autotune.study._record import (
    RunInfo,
    TrialRecord,
    confirmation_of,
    enqueue_baseline,
    knob_effects_of,
    read_retune_part,
    retune_part,
    set_retune_part,
    set_run_info,
)
from autotune.study._runs import autotune_version, previous_run, run_name, spec_hash, stored_spec_hash
from autotune.study._stop import DEFAULT_STOP_AFTER_FLAT, StopRecord, stop_record, store_baseline_values
from autotune.study._storage import make_storage, resolve_url, storage_errors
from autotune.study._warm import WarmStart, warm_start
from autotune.targets import Target, make_target

logger = logging.getLogger(__name__)


class Verdict(StrEnum):
    """What a scheduled run concluded; ``exit_code`` is what ``autotune study run-scheduled``
    exits with (1 stays autotune's errors, 2 click's usage errors, 130 an interruption)."""

    UNCHANGED = "unchanged"
    CHANGED = "changed"
    NONE_FEASIBLE = "none-feasible"

    @property
    def exit_code(self) -> int:
        return {Verdict.UNCHANGED: 0, Verdict.CHANGED: 3, Verdict.NONE_FEASIBLE: 4}[self]


class Moved(pydantic.BaseModel):
    """One thing that moved beyond the noise: ``what`` (``baseline``, ``previous recommendation``,
    ``new vs previous recommendation``), the objective, and the intervals before and now (changes
    in %; for the baseline, ``before``/``now`` are its means and ``change`` the Welch interval)."""

    what: str
    metric: str
    before: Interval | None = None
    now: Interval | None = None
    change: Interval | None = None
    text: str


class Outcome(pydantic.BaseModel):
    """A scheduled run's conclusion (stored as ``retune.outcome``)."""

    verdict: Verdict
    run: str
    previous: str | None
    recommendation: Recommendation | None
    previous_recommendation: Recommendation | None
    reasons: list[str]
    moved: list[Moved] = []
    manifests: dict[str, str] = {}

    def lines(self) -> list[str]:
        """The job's last log lines: the verdict, the recommendation, why, what moved."""
        rec = self.recommendation
        what = ("nothing to recommend" if rec is None else
                "Istio's defaults" if not rec.params else MeshConfig.from_params(dict(rec.params)).describe())
        head = {Verdict.UNCHANGED: "recommendation unchanged", Verdict.CHANGED: "recommendation changed",
                Verdict.NONE_FEASIBLE: "no feasible config"}[self.verdict]
        out = [f"{self.run}: {head}: {what}" + (f" ({rec.source})" if rec is not None and rec.source else "")]
        out += [f"  why: {r}" for r in self.reasons]
        out += [f"  moved: {m.text}" for m in self.moved]
        return out


def run_outcome_of(study: optuna.Study) -> Outcome | None:
    """The stored outcome of a scheduled run, if any."""
    return read_retune_part(study, "outcome", Outcome, "outcome")


def run_verdict(study: optuna.Study | optuna.study.StudySummary) -> Verdict | None:
    """The verdict a scheduled run stored (``None`` before its end, or for a plain study); works
    on a ``StudySummary`` (``autotune study list``)."""
    raw = retune_part(study, "outcome")
    verdict = raw.get("verdict") if isinstance(raw, dict) else None
    return Verdict(verdict) if verdict in set(Verdict) else None


@dataclass(frozen=True)
class RunResult:
    """What ``run_scheduled`` returns: the run's study (export it like any study), its outcome,
    re-check, warm start and stop record."""

    study: optuna.Study
    outcome: Outcome
    recheck: Recheck
    warm_start: WarmStart
    stop: StopRecord


def _this_run(study: optuna.Study, spec: StudySpec) -> Recommendation | None:
    """This run's recommendation (as the report's: the first confirmed Pareto config, else the
    Pareto config with the best first objective; ``{}`` when only the baseline is on the front)
    as its minimal config (knobs with no detected effect at Istio's default, as confirmed and
    exported); ``None`` when no config was feasible."""
    front = pareto_trials(study)
    if not front:
        return None
    confirmation = confirmation_of(study)
    cands = [t for t in front if not TrialRecord.read(t).baseline]
    confirmed = [t for t in cands if confirmation is not None and t.number in confirmation.results
                 and confirmation.results[t.number].confirmed]
    picks = confirmed or cands
    if not picks:
        return Recommendation(params={}, source=f"{study.study_name}#{front[0].number}", confirmed=False)
    pick = picks[0]
    config = minimal_config(TrialRecord.read(pick).config, knob_effects_of(study))[0]  # what was confirmed
    return Recommendation(params=config.to_params(), source=f"{study.study_name}#{pick.number}",
                          confirmed=bool(confirmed))


def _new_changes(study: optuna.Study, rec: Recommendation | None) -> dict[str, Interval]:
    """The confirmation intervals of this run's recommendation (empty when not confirmed)."""
    confirmation = confirmation_of(study)
    if rec is None or rec.source is None or confirmation is None:
        return {}
    number = int(rec.source.rpartition("#")[2])
    result = confirmation.results.get(number)
    return {m: Interval.of(c) for m, c in result.changes.items()} if result else {}


def _beats(spec: StudySpec, new: dict[str, Interval], old: dict[str, Interval]) -> list[str]:
    """The objectives on which ``new`` is better than ``old`` beyond both intervals and by more
    than ``measurement.driftThreshold`` of ``old``'s value, provided it is not worse beyond the
    intervals on any objective (``[]`` otherwise). Changes are in % of the same baseline."""
    better, worse = [], []
    for o in spec.objectives:
        a, b = new.get(o.metric), old.get(o.metric)
        if a is None or b is None:
            continue
        lower, higher = a.high_pct < b.low_pct, a.low_pct > b.high_pct
        ratio = (100 + a.mean_pct) / (100 + b.mean_pct) - 1 if b.mean_pct > -100 else 0.0
        material = abs(ratio) > spec.measurement.drift_threshold
        if (lower if o.direction == "minimize" else higher) and material:
            better.append(o.metric)
        elif higher if o.direction == "minimize" else lower:
            worse.append(o.metric)
    return [] if worse else better


def decide(study: optuna.Study, spec: StudySpec, checked: Recheck,
           previous_defaults: Recommendation | None = None) -> Outcome:
    """The run's outcome from its re-check and its own front (see the module docstring).
    ``previous_defaults``: the previous run recommended Istio's defaults (nothing to re-check
    then: they are the baseline)."""
    prev_entry = checked.recommendation()
    previous = None if prev_entry is None else Recommendation(params=prev_entry.params, source=prev_entry.source,
                                                             confirmed=bool(prev_entry.holds))
    new = _this_run(study, spec)
    new_changes = _new_changes(study, new)
    moved = [Moved(what="baseline", metric=m.metric, change=m.change,
                   text=f"baseline {metric_label(m.metric)} {m.before:.4g} → {m.now:.4g}, {m.change.text()}")
             for m in checked.baseline_moves if m.moved]
    reasons: list[str] = []
    if prev_entry is not None:
        for metric in prev_entry.moved:
            before, now = prev_entry.before[metric], prev_entry.changes[metric]
            moved.append(Moved(what="previous recommendation", metric=metric, before=before, now=now,
                               text=f"previous recommendation {metric_label(metric)} vs baseline: was "
                                    f"{before.text()}, now {now.text()} "
                                    f"({'worse' if metric in prev_entry.worse else 'better'})"))
    if prev_entry is None and previous_defaults is not None:
        previous = previous_defaults
        if new is None:
            verdict, rec = Verdict.NONE_FEASIBLE, None
        elif new.params and new.confirmed:
            verdict, rec = Verdict.CHANGED, new
            reasons.append(f"{new.source} is confirmed better than Istio's defaults, which the previous run "
                           "recommended")
        else:
            verdict, rec = Verdict.UNCHANGED, previous
            reasons.append("Istio's defaults, which the previous run recommended, remain the recommendation: "
                           "no config of this run was confirmed better")
    elif prev_entry is None:
        verdict, rec = (Verdict.CHANGED, new) if new is not None else (Verdict.NONE_FEASIBLE, None)
        reasons.append("the first run of the series" if checked.previous is None
                       else f"the previous run {checked.previous} recommended nothing to re-check")
    elif prev_entry.holds:
        better = _beats(spec, new_changes, prev_entry.changes) if new is not None and new.confirmed else []
        if better and new is not None and new.params != prev_entry.params:
            verdict, rec = Verdict.CHANGED, new
            reasons.append(f"the previous recommendation holds, but {new.source} is better on "
                           f"{', '.join(metric_label(m) for m in better)} beyond the intervals")
            for m in better:
                moved.append(Moved(what="new vs previous recommendation", metric=m, before=prev_entry.changes[m],
                                   now=new_changes[m], text=f"{metric_label(m)} vs baseline: previous recommendation "
                                   f"{prev_entry.changes[m].text()}, new {new_changes[m].text()}"))
        else:
            verdict, rec = Verdict.UNCHANGED, previous
            reasons.append("the previous recommendation holds: feasible in every re-check round, "
                           + ", ".join(f"{metric_label(m)} {c.text()}" for m, c in prev_entry.changes.items())
                           + " against the baseline")
    else:
        reasons.append(f"the previous recommendation no longer holds: {prev_entry.reason}")
        verdict, rec = (Verdict.CHANGED, new) if new is not None else (Verdict.NONE_FEASIBLE, None)
    if verdict == Verdict.NONE_FEASIBLE:
        reasons.append("no config measured in this run was feasible")
    return Outcome(verdict=verdict, run=study.study_name, previous=checked.previous, recommendation=rec,
                   previous_recommendation=previous, reasons=reasons, moved=moved,
                   manifests=_manifests(spec, rec.config) if rec is not None else {})


def _manifests(spec: StudySpec, config: MeshConfig) -> dict[str, str]:
    out = {"destinationrule.yaml": to_yaml(destination_rule(config, spec.service)),
           "deployment-patch.yaml": to_yaml(deployment_patch(config, spec.sidecar))}
    vs = virtual_service(config, spec.service)
    if vs is not None:
        out["virtualservice.yaml"] = to_yaml(vs)
    return out


def _unique_name(storage: optuna.storages.BaseStorage, name: str) -> str:
    taken = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}-{n}"
    return out


def run_scheduled(spec: StudySpec, observer: Observer | None = None, target: Target | None = None, *,
                  load: LoadDriver | None = None, now: Callable[[], datetime] | None = None) -> RunResult:
    """One scheduled run of the spec's series (``study.name``): a new study
    ``<series>-<UTC time>`` in the spec's storage that re-checks the previous run's recommendation
    against the baseline and what ``target`` runs now, carries the previous run's best configs into
    its search, stops when the front is flat, confirms its front and decides the outcome (see
    the module docstring). The study is not exported (``autotune.export`` does that). Errors are
    those of ``run_study``; Ctrl-C restores the target and leaves the run as it is (the next run
    starts a new one from the last run with a completed trial)."""
    obs = observer or NullObserver()
    series = spec.study.name
    url = resolve_url(spec.study.storage)
    storage = make_storage(url)
    started = (now or (lambda: datetime.now(UTC)))()
    with storage_errors(url, "read the runs of the series in"):
        name = _unique_name(storage, run_name(series, started))
        previous = previous_run(storage, series)
    overrides: dict[str, object] = {"study.name": name}
    if spec.measurement.stop_after_flat is None:
        overrides["measurement.stop_after_flat"] = DEFAULT_STOP_AFTER_FLAT
    run_spec = spec.with_overrides(**overrides)
    digest = spec_hash(spec)
    study = open_study(run_spec, storage)
    matched = previous is not None and stored_spec_hash(previous) == digest
    with storage_errors(url, "record the run in"):
        set_run_info(study, RunInfo(series=series, spec_hash=digest, version=autotune_version(),
                                    started=started.isoformat(), previous=previous.study_name if previous else None))
        enqueue_baseline(study)
        warm = warm_start(study, run_spec, previous, hash_matched=matched)
    logger.info("run %s of series %s%s", name, series,
                f", after {previous.study_name}" + ("" if matched else " (its spec differs)") if previous else
                " (the first)")
    checked: list[Recheck] = []

    def prelude(st: optuna.Study, tgt: Target, driver: LoadDriver) -> None:
        result = recheck(st, run_spec, tgt, previous, obs, load=driver)
        store_baseline_values(st, {m: [v for v in vals if v is not None] for m, vals in result.baseline.items()})
        checked.append(result)

    tgt = target or make_target(run_spec)
    study = run_study(run_spec, obs, tgt, load=load or default_driver(run_spec), prelude=prelude)
    result = checked[0] if checked else (recheck_of(study) or _empty(run_spec, previous))
    before = run_outcome_of(previous) if previous is not None else None
    defaults = before.recommendation if before is not None and before.recommendation is not None \
        and not before.recommendation.params else None
    outcome = decide(study, run_spec, result, defaults)
    set_retune_part(study, "outcome", outcome.model_dump(mode="json"))
    for line in outcome.lines():
        logger.info("%s", line)
    return RunResult(study=study, outcome=outcome, recheck=result, warm_start=warm, stop=stop_record(study))


def _empty(spec: StudySpec, previous: optuna.Study | None) -> Recheck:
    return Recheck(previous=previous.study_name if previous else None, rounds=0,
                   confidence=spec.measurement.confidence, applied_is_baseline=True, baseline={}, configs=[])


