"""The study loop: propose a config, measure it on a target under a load, record it, confirm the front.

Public pieces: ``run_study`` / ``run_single`` (the loop), ``measure_config`` (one measurement),
``confirm_front`` (interleaved re-measurement of the front), which knobs mattered
(``knob_effects``, ``minimal_config``), the front and baseline queries, the
trial record (``TrialRecord``, the only code that knows how a trial is stored), the statistics,
the objectives and constraints, samplers and storage, and the ``Observer`` protocol; the
scheduled job's ``run_scheduled`` (a series of runs, each re-checking the previous recommendation,
warm-started, stopped when its front is flat, with an ``Outcome`` and its ``Verdict``).
"""

from __future__ import annotations

from autotune.study._confirm import confirm_front
from autotune.study._effects import (
    MIN_TRIALS_PER_KNOB,
    can_reset,
    effect_metrics,
    knob_effects,
    minimal_config,
    record_knob_effects,
)
from autotune.study._front import baseline_trial, pareto_trials
from autotune.study._lease import StudyLease
from autotune.study._loop import (
    INTERRUPTED,
    config_of,
    counted_trials,
    fail_crashed_trials,
    open_study,
    outcome_of,
    run_single,
    run_study,
    suggest,
)
from autotune.study._measure import Measurement, default_driver, measure_config
from autotune.study._objectives import (
    CONSTRAINT_NAMES,
    METRIC_LABELS,
    METRIC_NAMES,
    constraint_values,
    metric_label,
    metric_name,
    objective_values,
    violations,
)
from autotune.study._progress import NullObserver, Observer, TrialOutcome
from autotune.study._recheck import Interval, Recheck, RecheckedConfig, Recommendation, recheck_of
from autotune.study._record import (
    MANIFESTS,
    Confirmation,
    ConfirmedConfig,
    KnobEffects,
    KnobTest,
    KnobVerdict,
    ObjectiveChange,
    RunInfo,
    StudyState,
    TrialRecord,
    confirmation_of,
    is_feasible,
    knob_effects_of,
    run_info,
    study_objectives,
    study_spec,
)
from autotune.study._retune import Moved, Outcome, RunResult, Verdict, run_outcome_of, run_scheduled, run_verdict
from autotune.study._runs import RunSummary, runs_of, spec_hash
from autotune.study._sampler import make_sampler
from autotune.study._stats import Change, aggregate, cv, paired_change
from autotune.study._stop import DEFAULT_STOP_AFTER_FLAT, StopRecord, hypervolume, stop_record
from autotune.study._storage import make_storage, redact, resolve_url, retry_storage, storage_errors
from autotune.study._warm import CarriedConfig, WarmStart, warm_start_of

__all__ = [
    "CONSTRAINT_NAMES",
    "DEFAULT_STOP_AFTER_FLAT",
    "INTERRUPTED",
    "MANIFESTS",
    "METRIC_LABELS",
    "METRIC_NAMES",
    "MIN_TRIALS_PER_KNOB",
    "CarriedConfig",
    "Change",
    "Confirmation",
    "ConfirmedConfig",
    "Interval",
    "KnobEffects",
    "KnobTest",
    "KnobVerdict",
    "Measurement",
    "Moved",
    "NullObserver",
    "ObjectiveChange",
    "Observer",
    "Outcome",
    "Recheck",
    "RecheckedConfig",
    "Recommendation",
    "RunInfo",
    "RunResult",
    "RunSummary",
    "StopRecord",
    "StudyLease",
    "StudyState",
    "TrialOutcome",
    "TrialRecord",
    "Verdict",
    "WarmStart",
    "aggregate",
    "baseline_trial",
    "can_reset",
    "config_of",
    "confirm_front",
    "confirmation_of",
    "constraint_values",
    "counted_trials",
    "cv",
    "default_driver",
    "effect_metrics",
    "fail_crashed_trials",
    "hypervolume",
    "is_feasible",
    "knob_effects",
    "knob_effects_of",
    "make_sampler",
    "make_storage",
    "measure_config",
    "metric_label",
    "metric_name",
    "minimal_config",
    "objective_values",
    "open_study",
    "outcome_of",
    "paired_change",
    "pareto_trials",
    "recheck_of",
    "record_knob_effects",
    "redact",
    "resolve_url",
    "retry_storage",
    "run_info",
    "run_outcome_of",
    "run_scheduled",
    "run_single",
    "run_study",
    "run_verdict",
    "runs_of",
    "spec_hash",
    "stop_record",
    "storage_errors",
    "study_objectives",
    "study_spec",
    "suggest",
    "violations",
    "warm_start_of",
]
