"""How a trial and a study are stored in Optuna: the only code that knows the user-attribute keys.

A trial's record is flat in ``Trial.user_attrs`` so that optuna-dashboard shows every metric as a
column: ``config`` (the Istio-named values; ``{}`` for the baseline), ``envoy_concurrency``,
``baseline`` / ``drift_check`` (set when the trial is enqueued), the two manifests by file name,
one key per metric (``None`` when not finite), ``violations``, ``status_counts``, ``observed``,
``timings``, ``spread_cv``, ``windows``, ``drift_pct``, ``aborted_after`` (where an early abort
stopped the trial: scenario, window, what was skipped, ``saved_s``), ``fail_reason``,
``fail_message``, ``worker`` (the lease token of the run that measured it, see ``_lease``) and
``carried_from`` (a scheduled run's warm start: the earlier trial it re-measures, see ``_warm``).
Feasibility is not a user attribute: it is read from the constraints the loop sets with
``Trial.set_constraint`` (Optuna stores them as system attributes, ``FrozenTrial.constraints``).

A study's record: ``objectives`` (metric names, in order), ``spec`` (the spec as JSON),
``confirmation`` (the last confirmation result), ``knob_effects`` (which knobs mattered, see
``_effects``) and the target's durable state (``target.<key>``);
a scheduled run (``autotune.study._retune``) also has ``run`` (its series, spec hash, autotune
version, start time and previous run, see ``RunInfo``) and ``retune.recheck`` /
``retune.warm_start`` / ``retune.stop`` / ``retune.outcome`` (JSON written and validated by the
modules that make them, through :func:`retune_part` and :func:`set_retune_part`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NotRequired, Protocol, TypeVar

import optuna
import pydantic
from optuna.trial import FrozenTrial, Trial, TrialState
from typing_extensions import TypedDict  # pydantic validates only this one on Python 3.11

from autotune.errors import FailReason
from autotune.mesh import MeshConfig

_CONFIG, _CONCURRENCY, _BASELINE, _DRIFT_CHECK = "config", "envoy_concurrency", "baseline", "drift_check"
_VIOLATIONS, _STATUS, _OBSERVED, _TIMINGS = "violations", "status_counts", "observed", "timings"
_SPREAD, _WINDOWS, _DRIFT_PCT = "spread_cv", "windows", "drift_pct"
_FAIL_REASON, _FAIL_MESSAGE, _WORKER = "fail_reason", "fail_message", "worker"
_ABORTED = "aborted_after"
_CARRIED = "carried_from"
logger = logging.getLogger(__name__)
#: The manifests stored with each trial, by file name (``virtualservice.yaml`` only when a route
#: setting is tuned).
MANIFESTS = ("destinationrule.yaml", "deployment-patch.yaml", "virtualservice.yaml")
#: Keys that are not metrics (``feasible`` was written by older versions and is ignored).
_NOT_METRICS = frozenset({_CONFIG, _CONCURRENCY, _BASELINE, _DRIFT_CHECK, _VIOLATIONS, _STATUS,
                          _OBSERVED, _TIMINGS, _SPREAD, _WINDOWS, _DRIFT_PCT, _FAIL_REASON,
                          _FAIL_MESSAGE, _WORKER, _ABORTED, _CARRIED, "feasible", *MANIFESTS})
#: A failure message is cut to its last this many characters.
MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class TrialRecord:
    """Everything a study records on one trial.

    ``metrics`` holds the aggregated measurement (NaN where no value was measured), ``windows``
    the per-window figures, ``spread_cv`` each metric's coefficient of variation over the windows.
    ``feasible`` is only meaningful on a record :meth:`read` from a finished trial: COMPLETE and
    every stored constraint <= 0.
    """

    config: MeshConfig = field(default_factory=MeshConfig)
    baseline: bool = False
    drift_check: bool = False
    manifests: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    windows: list[dict[str, float]] = field(default_factory=list)
    spread_cv: dict[str, float] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    observed: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    drift_pct: float | None = None
    aborted_after: dict[str, object] | None = None
    fail_reason: FailReason | None = None
    fail_message: str | None = None
    worker: str | None = None
    #: A warm-started trial: the earlier run's trial whose config it re-measures (``<study>#<n>``).
    carried_from: str | None = None
    feasible: bool = False

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C/SIGTERM: does not use up the budget and is run again."""
        return self.fail_reason == FailReason.INTERRUPTED

    @property
    def failed_by_run(self) -> bool:
        """Failed for a reason of the run, not of the config (interrupted, crashed, storage,
        internal error): does not use up the budget, and no observer reports it as a result."""
        return self.fail_reason is not None and not self.fail_reason.counts

    def write(self, trial: Trial) -> None:
        """Store this record on a running trial. Only keys whose value changed are written, so a
        record can be written when the trial starts and again, completed, when it ends."""
        current = trial.user_attrs
        for key, value in self.user_attrs().items():
            if key not in current or current[key] != value:
                trial.set_user_attr(key, value)

    def user_attrs(self) -> dict[str, object]:
        """The record as Optuna user attributes (what :meth:`write` stores; for
        ``optuna.trial.create_trial`` when a trial is made by hand)."""
        attrs: dict[str, object] = {_CONFIG: self.config.to_params(),
                                 _CONCURRENCY: self.config.effective_concurrency, **self.manifests}
        if self.baseline:
            attrs[_BASELINE] = True
        if self.drift_check:
            attrs[_DRIFT_CHECK] = True
        if self.metrics:
            attrs.update({k: v if math.isfinite(v) else None for k, v in self.metrics.items()})
            attrs.update({_VIOLATIONS: self.violations, _STATUS: self.status_counts,
                          _OBSERVED: self.observed, _TIMINGS: self.timings,
                          _SPREAD: self.spread_cv, _WINDOWS: self.windows})
        if self.drift_pct is not None:
            attrs[_DRIFT_PCT] = self.drift_pct
        if self.aborted_after is not None:
            attrs[_ABORTED] = self.aborted_after
        if self.fail_reason is not None:
            attrs[_FAIL_REASON] = self.fail_reason.value
        if self.fail_message is not None:
            attrs[_FAIL_MESSAGE] = self.fail_message[-MESSAGE_CHARS:]
        if self.worker is not None:
            attrs[_WORKER] = self.worker
        if self.carried_from is not None:
            attrs[_CARRIED] = self.carried_from
        return attrs

    @classmethod
    def read(cls, trial: FrozenTrial) -> TrialRecord:
        """The record of a stored trial (any state; fields it never got are empty)."""
        ua = trial.user_attrs
        metrics = {k: math.nan if v is None else float(v) for k, v in ua.items()
                   if k not in _NOT_METRICS and _is_number_or_none(v)}
        reason = ua.get(_FAIL_REASON)
        drift = ua.get(_DRIFT_PCT)
        return cls(
            config=MeshConfig.from_params(ua.get(_CONFIG, trial.params)),
            baseline=bool(ua.get(_BASELINE)), drift_check=bool(ua.get(_DRIFT_CHECK)),
            manifests={name: str(ua[name]) for name in MANIFESTS if name in ua},
            metrics=metrics, windows=list(ua.get(_WINDOWS) or []),
            spread_cv=dict(ua.get(_SPREAD) or {}), status_counts=dict(ua.get(_STATUS) or {}),
            observed=dict(ua.get(_OBSERVED) or {}), timings=dict(ua.get(_TIMINGS) or {}),
            violations=list(ua.get(_VIOLATIONS) or []),
            drift_pct=None if drift is None else float(drift),
            aborted_after=dict(ua[_ABORTED]) if isinstance(ua.get(_ABORTED), dict) else None,
            fail_reason=_reason(reason), fail_message=ua.get(_FAIL_MESSAGE),
            worker=ua.get(_WORKER), carried_from=ua.get(_CARRIED), feasible=is_feasible(trial),
        )


def _is_number_or_none(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _reason(value: object) -> FailReason | None:
    if not isinstance(value, str):
        return None
    try:
        return FailReason(value)
    except ValueError:  # a reason this version does not know (older or newer records)
        return None


def is_feasible(trial: FrozenTrial) -> bool:
    """COMPLETE with constraints stored and each <= 0 (Optuna's convention; see ``set_constraint``)."""
    constraints = trial.constraints
    return (trial.state == TrialState.COMPLETE and bool(constraints)
            and all(v <= 0.0 for v in constraints.values()))


def queued_flags(trial: Trial) -> tuple[bool, bool]:
    """``(baseline, drift_check)`` of a running trial, as :func:`enqueue_baseline` queued it."""
    ua = trial.user_attrs
    return bool(ua.get(_BASELINE)), bool(ua.get(_DRIFT_CHECK))


def enqueue_baseline(study: optuna.Study, *, drift_check: bool = False) -> None:
    """Queue a measurement of the Istio defaults (a re-measurement when ``drift_check``)."""
    attrs: dict[str, object] = {_BASELINE: True}
    if drift_check:
        attrs[_DRIFT_CHECK] = True
    study.enqueue_trial({}, user_attrs=attrs)


def enqueue_carried(study: optuna.Study, params: Mapping[str, object], source: str) -> None:
    """Queue a re-measurement of an earlier run's config (Optuna-named ``params``; parameters of
    the space left out are sampled), marked as carried from ``source`` (``<study>#<trial>``)."""
    study.enqueue_trial(dict(params), user_attrs={_CARRIED: source})


def queued_baseline(trial: FrozenTrial) -> bool:
    """A baseline measurement, whatever its state (WAITING ones included)."""
    return bool(trial.user_attrs.get(_BASELINE))


# -- the study's record ---------------------------------------------------------------------------

_OBJECTIVES, _SPEC, _CONFIRMATION, _TARGET = "objectives", "spec", "confirmation", "target."
_EFFECTS = "knob_effects"


class _HasUserAttrs(Protocol):
    @property
    def user_attrs(self) -> Mapping[str, object]: ...


def study_objectives(study: _HasUserAttrs) -> list[str] | None:
    """The metric names the study optimizes, in order (``None`` for a study not made by autotune).
    Works on a ``Study`` and on a ``StudySummary``."""
    value = study.user_attrs.get(_OBJECTIVES)
    return [str(v) for v in value] if isinstance(value, list) else None


def init_study_record(study: optuna.Study, objectives: Sequence[str], spec: Mapping[str, object]) -> None:
    """Record a new study's objectives and spec (the spec as JSON-able data)."""
    study.set_user_attr(_OBJECTIVES, list(objectives))
    study.set_user_attr(_SPEC, dict(spec))


def study_spec(study: optuna.Study) -> dict[str, object]:
    """The spec the study was created with, as JSON data (camelCase keys); ``{}`` if none."""
    return dict(study.user_attrs.get(_SPEC) or {})


@dataclass(frozen=True)
class ObjectiveChange:
    """One objective's change of a config against the same rounds' baseline, in %, with the
    confidence interval ``[low_pct, high_pct]`` (rounded to 2 decimals)."""

    mean_pct: float
    low_pct: float
    high_pct: float


@dataclass(frozen=True)
class ConfirmedConfig:
    """The confirmation of one Pareto config (trial ``trial``): ``rounds`` paired rounds (both
    measured), ``infeasible_rounds`` rounds where it failed or broke a constraint, each objective's
    change (empty with fewer than 2 paired rounds), and why it is not ``confirmed`` (``None`` when
    it is). ``reset``: the knobs of the trial's config that were put back to Istio's default for
    the measurement, because they had no detected effect (the minimal config; empty: the trial's
    config as searched)."""

    trial: int
    rounds: int
    infeasible_rounds: int
    changes: dict[str, ObjectiveChange]
    confirmed: bool
    reason: str | None = None
    reset: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Confirmation:
    """A confirmation result: the front's trial numbers (in the order measured), the number of
    rounds, the confidence of the intervals, the baseline's value of each objective per round
    (``None`` for a failed round) and each config's result by trial number."""

    trials: list[int]
    rounds: int
    confidence: float
    baseline: dict[str, list[float | None]]
    results: dict[int, ConfirmedConfig]


# The JSON stored in the study's ``confirmation`` user attribute (results keyed by the trial number
# as a string, ``reason`` only when not confirmed); only :func:`confirmation_of` and
# :func:`set_confirmation` see it.
class _ChangeJSON(TypedDict):
    mean_pct: float
    low_pct: float
    high_pct: float


class _ConfigJSON(TypedDict):
    rounds: int
    infeasible_rounds: int
    changes: dict[str, _ChangeJSON]
    confirmed: bool
    reason: NotRequired[str]
    reset: NotRequired[list[str]]  # absent in studies confirmed before the minimal configs


class _ConfirmationJSON(TypedDict):
    trials: list[int]
    rounds: int
    confidence: float
    baseline: dict[str, list[float | None]]
    results: dict[str, _ConfigJSON]


_CONFIRMATION_JSON = pydantic.TypeAdapter(_ConfirmationJSON)


def confirmation_of(study: optuna.Study) -> Confirmation | None:
    """The stored confirmation result (see ``confirm_front``), if any. One this version cannot
    read is logged and treated as absent (the front is then confirmed again)."""
    value = study.user_attrs.get(_CONFIRMATION)
    if not value:
        return None
    try:
        data = _CONFIRMATION_JSON.validate_python(value)
    except pydantic.ValidationError as exc:
        logger.warning("ignoring the stored confirmation of study %s: %s", study.study_name, exc)
        return None
    results = {int(n): ConfirmedConfig(
        trial=int(n), rounds=c["rounds"], infeasible_rounds=c["infeasible_rounds"],
        changes={m: ObjectiveChange(ch["mean_pct"], ch["low_pct"], ch["high_pct"])
                 for m, ch in c["changes"].items()},
        confirmed=c["confirmed"], reason=c.get("reason"), reset=list(c.get("reset", [])))
        for n, c in data["results"].items()}
    return Confirmation(trials=data["trials"], rounds=data["rounds"], confidence=data["confidence"],
                        baseline=data["baseline"], results=results)


def set_confirmation(study: optuna.Study, result: Confirmation) -> None:
    """Store ``result`` as the study's confirmation (replacing any earlier one)."""
    results: dict[str, _ConfigJSON] = {}
    for number, c in result.results.items():
        entry: _ConfigJSON = {
            "rounds": c.rounds, "infeasible_rounds": c.infeasible_rounds,
            "changes": {m: {"mean_pct": ch.mean_pct, "low_pct": ch.low_pct, "high_pct": ch.high_pct}
                        for m, ch in c.changes.items()},
            "confirmed": c.confirmed}
        if c.reason is not None:
            entry["reason"] = c.reason
        if c.reset:
            entry["reset"] = list(c.reset)
        results[str(number)] = entry
    data: _ConfirmationJSON = {"trials": list(result.trials), "rounds": result.rounds,
                               "confidence": result.confidence, "baseline": dict(result.baseline),
                               "results": results}
    study.set_user_attr(_CONFIRMATION, data)


@dataclass(frozen=True)
class KnobTest:
    """One knob tested against one metric (``<scenario>.<metric>``): ``effect`` is the share of
    the metric's rank variance the knob explains beyond the other knobs (partial R², 0–1),
    ``p_value`` the family-wise adjusted p-value (see ``_effects``)."""

    metric: str
    effect: float
    p_value: float


@dataclass(frozen=True)
class KnobVerdict:
    """The verdict on one searched parameter: ``matters`` when at least one test's adjusted
    p-value is at most the study's ``alpha``; ``where`` names those metrics, smallest p first;
    ``tests`` holds every metric tested, smallest p first (empty: the knob could not be tested,
    e.g. too few trials or a value that never varied)."""

    parameter: str
    matters: bool
    where: list[str]
    tests: list[KnobTest]

    @property
    def tested(self) -> bool:
        return bool(self.tests)


@dataclass(frozen=True)
class KnobEffects:
    """Which knobs mattered in a study: the family-wise error rate ``alpha`` of the whole table,
    the ``permutations`` of the null distribution, the ``trials`` analysed, the model each metric
    was tested with (``conditional`` or ``marginal``; a metric missing there could not be tested)
    and one verdict per searched parameter, in search-space order."""

    alpha: float
    permutations: int
    trials: int
    models: dict[str, str]
    verdicts: list[KnobVerdict]

    def verdict(self, parameter: str) -> KnobVerdict | None:
        return next((v for v in self.verdicts if v.parameter == parameter), None)

    @property
    def null_knobs(self) -> list[str]:
        """Parameters tested with no detected effect (what a minimal config resets)."""
        return [v.parameter for v in self.verdicts if v.tested and not v.matters]


class _TestJSON(TypedDict):
    metric: str
    effect: float
    p_value: float


class _VerdictJSON(TypedDict):
    parameter: str
    matters: bool
    where: list[str]
    tests: list[_TestJSON]


class _EffectsJSON(TypedDict):
    alpha: float
    permutations: int
    trials: int
    models: dict[str, str]
    verdicts: list[_VerdictJSON]


_EFFECTS_JSON = pydantic.TypeAdapter(_EffectsJSON)


def knob_effects_of(study: optuna.Study) -> KnobEffects | None:
    """The stored knob verdicts (see ``_effects.knob_effects``), if any (``None`` for a study
    analysed by no version that knew them). One this version cannot read is logged and ignored."""
    value = study.user_attrs.get(_EFFECTS)
    if not value:
        return None
    try:
        data = _EFFECTS_JSON.validate_python(value)
    except pydantic.ValidationError as exc:
        logger.warning("ignoring the stored knob effects of study %s: %s", study.study_name, exc)
        return None
    verdicts = [KnobVerdict(parameter=v["parameter"], matters=v["matters"], where=list(v["where"]),
                            tests=[KnobTest(t["metric"], t["effect"], t["p_value"]) for t in v["tests"]])
                for v in data["verdicts"]]
    return KnobEffects(alpha=data["alpha"], permutations=data["permutations"], trials=data["trials"],
                       models=dict(data["models"]), verdicts=verdicts)


def set_knob_effects(study: optuna.Study, effects: KnobEffects) -> None:
    """Store ``effects`` as the study's knob verdicts (replacing any earlier ones)."""
    data: _EffectsJSON = {
        "alpha": effects.alpha, "permutations": effects.permutations, "trials": effects.trials,
        "models": dict(effects.models),
        "verdicts": [{"parameter": v.parameter, "matters": v.matters, "where": list(v.where),
                      "tests": [{"metric": t.metric, "effect": t.effect, "p_value": t.p_value}
                                for t in v.tests]} for v in effects.verdicts]}
    study.set_user_attr(_EFFECTS, data)


class StudyState:
    """The study's user attributes as a target's durable state (keys prefixed ``target.``)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def get(self, key: str) -> object:
        """The JSON value stored under ``key``, ``None`` if none."""
        return self.study.user_attrs.get(f"{_TARGET}{key}")

    def set(self, key: str, value: object) -> None:
        """Store ``value`` (JSON-able) under ``key``, replacing any earlier value."""
        self.study.set_user_attr(f"{_TARGET}{key}", value)


# -- a scheduled run's record ----------------------------------------------------------------------

_RUN, _RETUNE = "run", "retune."
#: The parts of a scheduled run's result stored on its study (``retune.<part>``).
RETUNE_PARTS = ("recheck", "warm_start", "stop", "outcome")


@dataclass(frozen=True)
class RunInfo:
    """A scheduled run: its ``series`` (the spec's study name), the hash of the spec's parts
    that define the search (``spec_hash``), the autotune ``version`` that ran it, its ``started``
    time (UTC, ISO 8601) and the ``previous`` run it continued from (``None`` for the first)."""

    series: str
    spec_hash: str
    version: str
    started: str
    previous: str | None = None


def run_info(study: _HasUserAttrs) -> RunInfo | None:
    """The run record of a scheduled run (``None`` for a plain study). Works on a ``Study`` and
    on a ``StudySummary``."""
    value = study.user_attrs.get(_RUN)
    if not isinstance(value, dict):
        return None
    try:
        return RunInfo(series=str(value["series"]), spec_hash=str(value["spec_hash"]),
                       version=str(value["version"]), started=str(value["started"]),
                       previous=None if value.get("previous") is None else str(value["previous"]))
    except KeyError:
        return None


def set_run_info(study: optuna.Study, info: RunInfo) -> None:
    """Record ``study`` as a scheduled run."""
    study.set_user_attr(_RUN, {"series": info.series, "spec_hash": info.spec_hash, "version": info.version,
                               "started": info.started, "previous": info.previous})


def retune_part(study: _HasUserAttrs, part: str) -> object | None:
    """The stored JSON of one part of a scheduled run's result (see ``RETUNE_PARTS``)."""
    if part not in RETUNE_PARTS:
        raise ValueError(f"part must be one of {RETUNE_PARTS}, got {part!r}")
    return study.user_attrs.get(f"{_RETUNE}{part}")


_M = TypeVar("_M", bound=pydantic.BaseModel)


def read_retune_part(study: optuna.Study, part: str, model: type[_M], what: str) -> _M | None:
    """One stored part of a scheduled run's result read as ``model``; ``None`` when absent, and
    when this version cannot read it (logged as ``ignoring the stored <what> of study …``)."""
    raw = retune_part(study, part)
    if not isinstance(raw, dict):
        return None
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        logger.warning("ignoring the stored %s of study %s: %s", what, study.study_name, exc)
        return None


def set_retune_part(study: optuna.Study, part: str, data: object) -> None:
    """Store one part of a scheduled run's result (JSON-able ``data``), replacing any earlier."""
    if part not in RETUNE_PARTS:
        raise ValueError(f"part must be one of {RETUNE_PARTS}, got {part!r}")
    study.set_user_attr(f"{_RETUNE}{part}", data)
