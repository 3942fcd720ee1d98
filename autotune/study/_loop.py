"""The study loop: propose a config, measure it on the target, record it, restore on failure."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from autotune.errors import AutotuneError, FailReason, TrialFailed
from autotune.mesh import PARAMETERS, MeshConfig, deployment_patch, destination_rule, to_yaml
from autotune.spec import SearchParam, StudySpec
from autotune.study._confirm import confirm_front
from autotune.study._front import baseline_trial, pareto_trials
from autotune.study._measure import Measurement, measure_config
from autotune.study._objectives import CONSTRAINT_NAMES, constraint_values, objective_values, violations
from autotune.study._progress import NullObserver, Observer, TrialOutcome
from autotune.study._sampler import make_sampler
from autotune.study._storage import make_storage
from autotune.targets import Target, make_target

log = logging.getLogger(__name__)
INTERRUPTED = FailReason.INTERRUPTED.value
#: Metrics whose per-window values and spread are recorded on each trial.
SPREAD_KEYS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cpu_cores", "achieved_rps",
               "throughput_ratio", "error_rate")


def suggest(trial: Trial, space: list[SearchParam]) -> MeshConfig:
    """Ask the sampler for one value per parameter of the space (CPU in cores, 1m precision)."""
    values: dict[str, int | float] = {}
    for p in space:
        if p.info.kind == "cpu":
            v = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            values[p.name] = round(v, 3)
        else:
            step = int(p.step) if p.step else 1
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=step, log=p.log)
    return MeshConfig.from_params(values)


def config_of(trial: FrozenTrial) -> MeshConfig:
    """The config a recorded trial ran with (the baseline has no sampled params)."""
    return MeshConfig.from_params(trial.user_attrs.get("config", trial.params))


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget: completed ones and real failures, not Ctrl-C'd or crashed
    ones, nor the baseline's drift re-measurements."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        reason = t.user_attrs.get("fail_reason")
        if t.user_attrs.get("drift_check"):
            continue
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and reason
                                              and reason != INTERRUPTED):
            n += 1
    return n


def open_study(spec: StudySpec) -> optuna.Study:
    """Create or load the spec's study. A study of the same name with other objectives is refused."""
    storage = make_storage(spec.study.storage)
    sampler = make_sampler(spec.study.sampler, spec.study.seed)
    metrics = [o.metric for o in spec.objectives]
    directions = [o.direction for o in spec.objectives]
    study = optuna.create_study(study_name=spec.study.name, storage=storage, sampler=sampler,
                                directions=directions, load_if_exists=True)
    existing = study.user_attrs.get("objectives")
    if existing is None:
        study.set_user_attr("objectives", metrics)
        study.set_user_attr("spec", json.loads(spec.model_dump_json(by_alias=True)))
    elif existing != metrics:
        raise AutotuneError(
            f"study {spec.study.name!r} already exists with objectives {existing}, not {metrics}; "
            "choose another name with --study-name"
        )
    return study


def _drift_check_due(study: optuna.Study, every: int) -> bool:
    """``every`` trials have finished since the latest baseline measurement (0 turns it off)."""
    if every <= 0:
        return False
    since = 0
    for t in reversed(study.get_trials(deepcopy=False)):
        if t.user_attrs.get("baseline") and t.state in (TrialState.COMPLETE, TrialState.WAITING,
                                                        TrialState.RUNNING):
            return since >= every
        if t.state in (TrialState.COMPLETE, TrialState.FAIL):
            since += 1
    return False


def _has_baseline(study: optuna.Study) -> bool:
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    return any(t.user_attrs.get("baseline") and t.state in live
               for t in study.get_trials(deepcopy=False))


class StudyState:
    """The study's user attributes as a target's durable state (keys prefixed ``target.``)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def get(self, key: str) -> Any:
        return self.study.user_attrs.get(f"target.{key}")

    def set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(f"target.{key}", value)


class _Objective:
    """The Optuna objective: one trial on the target, everything recorded on the trial."""

    def __init__(self, spec: StudySpec, target: Target, observer: Observer, total: int) -> None:
        self.spec, self.target, self.observer, self.total = spec, target, observer, total
        self.space = spec.search_space()

    def __call__(self, trial: Trial) -> list[float]:
        baseline = bool(trial.user_attrs.get("baseline"))
        config = MeshConfig() if baseline else suggest(trial, self.space)
        self._record_config(trial, config)
        index = counted_trials(trial.study) + 1
        if trial.user_attrs.get("drift_check"):
            self.observer.trial_started(trial.number, index - 1, self.total, config, baseline,
                                        stage="baseline drift check")
        else:
            self.observer.trial_started(trial.number, index, self.total, config, baseline)
        try:
            measured = measure_config(self.target, self.spec, config, self.observer)
            try:
                values = objective_values(self.spec.objectives, measured.metrics)
            except ValueError as exc:
                raise TrialFailed(FailReason.NO_SUCCESS, str(exc)) from None
        except TrialFailed as exc:
            self._fail(trial, config, exc.reason, str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPTED)
            raise
        self._record(trial, measured)
        return values

    def _record_config(self, trial: Trial, config: MeshConfig) -> None:
        trial.set_user_attr("config", config.to_params())
        trial.set_user_attr("envoy_concurrency", config.effective_concurrency)
        trial.set_user_attr("destinationrule.yaml",
                            to_yaml(destination_rule(config, self.spec.service)))
        trial.set_user_attr("deployment-patch.yaml",
                            to_yaml(deployment_patch(config, self.spec.sidecar)))

    def _record(self, trial: Trial, m: Measurement) -> None:
        for key, value in m.metrics.items():
            trial.set_user_attr(key, value if math.isfinite(value) else None)
        rules = self.spec.constraints
        for name, value in zip(CONSTRAINT_NAMES, constraint_values(rules, m.metrics), strict=True):
            trial.set_constraint(name, value)  # <= 0 is feasible; the samplers read these
        broken = violations(rules, m.metrics)
        trial.set_user_attr("feasible", not broken)
        trial.set_user_attr("violations", broken)
        trial.set_user_attr("status_counts", m.status_counts)
        trial.set_user_attr("observed", m.observed)
        trial.set_user_attr("timings", {k: round(v, 3) for k, v in m.timings.items()})
        trial.set_user_attr("spread_cv", {k: round(v, 4) for k, v in m.spread.items() if k in SPREAD_KEYS})
        trial.set_user_attr("windows", [{k: round(w[k], 4) for k in SPREAD_KEYS} for w in m.windows])
        if trial.user_attrs.get("drift_check"):
            self._check_drift(trial, m.metrics)

    def _check_drift(self, trial: Trial, metrics: dict[str, float]) -> None:
        """Compare a baseline re-measurement with the first baseline; report drift past the threshold."""
        first = baseline_trial(trial.study, first=True)
        if first is None or not first.user_attrs.get("latency_p95_ms"):
            return
        before, now = float(first.user_attrs["latency_p95_ms"]), metrics["latency_p95_ms"]
        drift = (now - before) / before
        trial.set_user_attr("drift_pct", round(100 * drift, 2))
        if abs(drift) > self.spec.measurement.drift_threshold:
            log.warning("baseline drift: p95 %.2f ms now vs %.2f ms at trial %d (%+.0f%%); later trials "
                        "are compared with this nearer baseline", now, before, first.number, 100 * drift)

    def _fail(self, trial: Trial, config: MeshConfig, reason: str, message: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("fail_message", message[-2000:])
        log.warning("trial %d failed with %s: %s", trial.number, config.describe(), message)
        try:
            self.target.restore()
        except AutotuneError as exc:
            log.error("could not restore the baseline after trial %d: %s", trial.number, exc)


def outcome_of(trial: FrozenTrial) -> TrialOutcome:
    """A recorded trial as the observer sees it."""
    ua = trial.user_attrs
    metrics = {k: float(v) for k, v in ua.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return TrialOutcome(
        number=trial.number, config=config_of(trial), baseline=bool(ua.get("baseline")),
        state=trial.state.name, metrics=metrics, feasible=bool(ua.get("feasible")),
        reason=str(ua.get("fail_message", "")), violations=list(ua.get("violations") or []),
        timings=dict(ua.get("timings") or {}), counts=not ua.get("drift_check"),
    )


def run_study(spec: StudySpec, observer: Observer | None = None,
              target: Target | None = None) -> optuna.Study:
    """Run (or continue) the spec's study until its trial budget is used.

    The Istio-default baseline is measured first. A failed trial is recorded FAIL with its reason,
    the target is restored and the study goes on. On Ctrl-C (KeyboardInterrupt) the load is
    stopped, the target restored and closed, and the exception re-raised; running again resumes.
    Writes no files: exports are ``autotune.export``'s job.
    """
    obs = observer or NullObserver()
    study = open_study(spec)
    total = spec.study.trials
    done = counted_trials(study)
    obs.study_started(spec.study.name, done, total)
    if done < total:
        tgt = target or make_target(spec)
        tgt.check_supported(spec.search_space())
        if not _has_baseline(study):
            study.enqueue_trial({}, user_attrs={"baseline": True})

        def after_trial(st: optuna.Study, t: FrozenTrial) -> None:
            if t.user_attrs.get("fail_reason") != INTERRUPTED:
                obs.trial_finished(outcome_of(t), [outcome_of(p) for p in pareto_trials(st)])
            if counted_trials(st) >= total:
                st.stop()
            elif _drift_check_due(st, spec.measurement.drift_every):
                st.enqueue_trial({}, user_attrs={"baseline": True, "drift_check": True})

        tgt.bind_state(StudyState(study))
        try:
            tgt.start()
            study.optimize(_Objective(spec, tgt, obs, total), callbacks=[after_trial],
                           catch=(TrialFailed,))
            if counted_trials(study) >= total:
                confirm_front(study, spec, tgt, obs)
        finally:
            tgt.close()
    return study


def run_single(spec: StudySpec, config: MeshConfig, observer: Observer | None = None,
               target: Target | None = None) -> Measurement:
    """Measure one config once (``autotune trial run``); the target is closed afterwards."""
    tgt = target or make_target(spec)
    tgt.check_supported([SearchParam(name=n, info=PARAMETERS[n], low=v, high=v)
                         for n, v in config.to_params().items()])
    with tgt:
        return measure_config(tgt, spec, config, observer)
