"""The study loop: propose a config, measure it on the target, record it, restore on failure."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, Trial, TrialState

from autotune.errors import (
    AutotuneError,
    ExportError,
    FailReason,
    StorageError,
    TrialFailed,
    UnsupportedParameter,
)
from autotune.load import LoadDriver
from autotune.mesh import (
    NO_LIMIT,
    PARAMETERS,
    MeshConfig,
    ParamValue,
    manifest_files,
)
from autotune.spec import SearchParam, StudySpec
from autotune.study._artifacts import artifacts_dir, open_store, upload_measurement
from autotune.study._confirm import confirm_front
from autotune.study._effects import record_knob_effects
from autotune.study._front import baseline_trial, pareto_trials
from autotune.study._lease import StudyLease
from autotune.study._measure import Measurement, default_driver, measure_config
from autotune.study._objectives import (
    constraint_values,
    lookup,
    metric_name,
    objective_values,
    violations,
)
from autotune.study._progress import NullObserver, Observer, TrialOutcome
from autotune.study._record import (
    StudyState,
    TrialRecord,
    enqueue_baseline,
    init_study_record,
    queued_baseline,
    queued_flags,
    study_objectives,
)
from autotune.study._sampler import make_sampler
from autotune.study._stop import should_stop, stop_after_flat
from autotune.study._storage import make_storage, resolve_url, retry_storage, storage_errors
from autotune.targets import Target, make_target

logger = logging.getLogger(__name__)
INTERRUPTED = FailReason.INTERRUPTED.value
#: Metrics whose per-window values and spread are recorded on each trial.
SPREAD_KEYS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_p99_corrected_ms",
               "cpu_cores", "achieved_rps", "goodput_rps", "throughput_ratio", "error_rate")


def suggest(trial: Trial, space: list[SearchParam]) -> MeshConfig:
    """Ask the sampler for one value per parameter of the space (CPU in cores, 1m precision;
    durations in whole ms; a ``choice`` as its string). A CPU limit that may be unset is asked
    as the categorical ``<name>:unset`` first and, when it is not, as a number."""
    values: dict[str, ParamValue] = {}
    for p in space:
        if p.info.kind == "choice":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.unset and trial.suggest_categorical(f"{p.name}:unset", [False, True]):
            values[p.name] = NO_LIMIT
        elif p.info.kind == "cpu":
            v = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            values[p.name] = round(v, 3)
        else:
            step = int(p.step) if p.step else 1
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=step, log=p.log)
    return MeshConfig.from_params(values)


def config_of(trial: FrozenTrial) -> MeshConfig:
    """The config a recorded trial ran with (the baseline has no sampled params)."""
    return TrialRecord.read(trial).config


def _counts(trial: FrozenTrial) -> bool:
    """Uses up the budget: completed, or failed for a reason of the config; not failed for a
    reason of the run (interrupted, crashed, storage, internal error; see ``FailReason.counts``),
    nor a baseline drift re-measurement."""
    rec = TrialRecord.read(trial)
    if rec.drift_check:
        return False
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and rec.fail_reason is not None and rec.fail_reason.counts)


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget (see ``_counts``)."""
    return sum(_counts(t) for t in study.get_trials(deepcopy=False))


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load the spec's study (in ``storage``, default: the spec's). A study of the same
    name with other objectives is refused. Storage failures raise ``StorageError``."""
    url = resolve_url(spec.study.storage)
    storage = storage or make_storage(url)
    sampler = make_sampler(spec.study.sampler, spec.study.seed)
    metrics = [o.metric for o in spec.objectives]
    directions = [o.direction for o in spec.objectives]
    with storage_errors(url, "open the study in"):
        study = optuna.create_study(study_name=spec.study.name, storage=storage, sampler=sampler,
                                    directions=directions, load_if_exists=True)
        existing = study_objectives(study)
        if existing is None:
            init_study_record(study, metrics, json.loads(spec.model_dump_json(by_alias=True)))
    if existing is not None and existing != metrics:
        raise AutotuneError(
            f"study {spec.study.name!r} already exists with objectives {existing}, not {metrics}; "
            "choose another name with --study-name"
        )
    study.set_metric_names([metric_name(m) for m in metrics])  # the dashboard's axis titles
    return study


def fail_crashed_trials(study: optuna.Study, lease: StudyLease) -> list[int]:
    """Record as FAIL, reason ``crashed``, every RUNNING trial whose run is gone: its worker holds
    no live lease (or, for a trial not yet marked with its worker, no other run holds one).
    Returns their numbers. Call with the lease held."""
    live = lease.live_tokens()
    others = live - {lease.token}
    crashed = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rec = TrialRecord.read(frozen)
        if (rec.worker in live) if rec.worker is not None else bool(others):
            continue
        trial = Trial(study, frozen._trial_id)
        replace(rec, fail_reason=FailReason.CRASHED,
                fail_message="the run measuring this trial ended without recording it (killed "
                             "or crashed); it does not count and another trial is run").write(trial)
        study.tell(trial, state=TrialState.FAIL)
        logger.warning("trial %d (%s) was left running by a run that is gone; recorded as crashed",
                       frozen.number, rec.config.describe())
        crashed.append(frozen.number)
    return crashed


_LIVE = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)


def _drift_check_due(study: optuna.Study, every: int) -> bool:
    """``every`` trials have finished since the latest baseline measurement (0 turns it off)."""
    if every <= 0:
        return False
    since = 0
    for t in reversed(study.get_trials(deepcopy=False)):
        if queued_baseline(t) and t.state in _LIVE:
            return since >= every
        if t.state in (TrialState.COMPLETE, TrialState.FAIL):
            since += 1
    return False


def _has_baseline(study: optuna.Study) -> bool:
    return any(queued_baseline(t) and t.state in _LIVE for t in study.get_trials(deepcopy=False))


def _reason_of(exc: BaseException) -> FailReason:
    """The reason recorded on a trial ended by an exception other than ``TrialFailed``."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return FailReason.INTERRUPTED
    if isinstance(exc, StorageError):
        return FailReason.STORAGE
    return FailReason.INTERNAL


class _Objective:
    """One trial on the target under the load, recorded on the trial.

    Every way out of a trial leaves a reason on it: ``TrialFailed`` records its reason, restores
    the target and returns ``None`` (the study goes on); any other exception (Ctrl-C, SIGTERM,
    a storage failure, a bug) records ``interrupted`` / ``storage`` / ``internal-error`` and is
    re-raised (``run_study`` then restores and closes the target).
    """

    def __init__(self, spec: StudySpec, target: Target, load: LoadDriver, observer: Observer,
                 total: int, worker: str, url: str, store: FileSystemArtifactStore) -> None:
        self.spec, self.target, self.load, self.observer, self.total = spec, target, load, observer, total
        self.worker, self.url = worker, url
        self.space = spec.search_space()
        self.store = store

    def __call__(self, trial: Trial) -> list[float] | None:
        baseline, drift_check = queued_flags(trial)
        config = MeshConfig() if baseline else suggest(trial, self.space)
        record = self._start(trial, config, baseline, drift_check)
        try:
            measured = measure_config(self.target, self.spec, config, self.observer, load=self.load,
                                      early_abort=None if not baseline else False)
            first = self.spec.scenario_list()[0].name
            if measured.aborted is not None:
                values = self._aborted_values(trial, measured)
            else:
                try:
                    values = objective_values(self.spec.objectives, measured.metrics, first)
                except ValueError as exc:
                    raise TrialFailed(FailReason.NO_SUCCESS, str(exc)) from None
            self._finish(trial, record, measured)
            # Artifacts (manifests, windows, latency chart) for the dashboard, once the trial is
            # recorded (an upload error is logged, never fatal).
            upload_measurement(self.store, trial, record.manifests, measured)
        except TrialFailed as exc:
            self._fail(trial, record, exc.reason, str(exc))
            self._restore(trial)
            return None
        except BaseException as exc:
            self._fail(trial, record, _reason_of(exc), _describe(exc))
            raise
        return values

    def _aborted_values(self, trial: Trial, m: Measurement) -> list[float]:
        """Objective values of a trial stopped by an early abort (infeasible by its constraints,
        which is what the samplers learn from): each objective's measured value where its
        scenario ran, else a finite placeholder — the worst value of that objective among the
        study's completed trials (0 when there is none)."""
        first = self.spec.scenario_list()[0].name
        done = [t.values for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None]
        values = []
        for i, o in enumerate(self.spec.objectives):
            value = lookup(m.metrics, o.metric, first)
            if not math.isfinite(value):
                seen = [v[i] for v in done if math.isfinite(v[i])]
                value = (max(seen) if o.direction == "minimize" else min(seen)) if seen else 0.0
            values.append(value)
        return values

    def _write(self, trial: Trial, record: TrialRecord, doing: str) -> None:
        retry_storage(lambda: record.write(trial), f"{doing} of trial {trial.number} in", self.url)

    def _start(self, trial: Trial, config: MeshConfig, baseline: bool, drift_check: bool) -> TrialRecord:
        """Record the config (and its manifests) before measuring, and tell the observer."""
        manifests = manifest_files(config, self.spec.service, self.spec.sidecar)
        record = TrialRecord(config=config, baseline=baseline, drift_check=drift_check,
                             worker=self.worker, manifests=manifests)
        self._write(trial, record, "record the start")
        index = counted_trials(trial.study) + 1
        if drift_check:
            self.observer.trial_started(trial.number, index - 1, self.total, config, baseline,
                                        stage="baseline drift check")
        else:
            self.observer.trial_started(trial.number, index, self.total, config, baseline)
        return record

    def _finish(self, trial: Trial, record: TrialRecord, m: Measurement) -> None:
        """Record the measurement: the constraints, then every record key (retried within the
        storage's bound). If the storage refuses, the measured figures are logged on one line
        before the ``StorageError`` goes up."""
        scenarios = self.spec.scenario_list()
        done = replace(
            record, metrics=m.metrics, violations=violations(scenarios, m.metrics),
            status_counts=m.status_counts, observed=m.observed,
            timings={k: round(v, 3) for k, v in m.timings.items()},
            spread_cv={k: round(v, 4) for k, v in m.spread.items()
                       if (k.partition(".")[2] or k) in SPREAD_KEYS},
            windows=[{k: round(w[k], 4) for k in SPREAD_KEYS if k in w} for w in m.windows],
            drift_pct=self._drift_pct(trial, m.metrics) if record.drift_check else None,
            aborted_after=m.aborted.to_dict() if m.aborted is not None else None,
        )
        constraints = constraint_values(scenarios, m.metrics)

        def write() -> None:
            for name, value in constraints:
                trial.set_constraint(name, value)  # <= 0 is feasible; the samplers read these
            done.write(trial)

        try:
            retry_storage(write, f"record the measurement of trial {trial.number} in", self.url)
        except StorageError:
            logger.error("trial %d (%s) was measured but not recorded: %s", trial.number,
                         record.config.describe(), json.dumps(
                             {k: v for k, v in m.metrics.items() if math.isfinite(v)}))
            raise

    def _drift_pct(self, trial: Trial, metrics: dict[str, float]) -> float | None:
        """A baseline re-measurement's p95 against the first baseline's, in %; logs drift past
        the threshold."""
        first = baseline_trial(trial.study, first=True)
        before = TrialRecord.read(first).metrics.get("latency_p95_ms") if first else None
        if first is None or not before or not math.isfinite(before):
            return None
        now = metrics["latency_p95_ms"]
        drift = (now - before) / before
        if abs(drift) > self.spec.measurement.drift_threshold:
            logger.warning("baseline drift: p95 %.2f ms now vs %.2f ms at trial %d (%+.0f%%); later "
                           "trials are compared with this nearer baseline", now, before, first.number,
                           100 * drift)
        return round(100 * drift, 2)

    def _fail(self, trial: Trial, record: TrialRecord, reason: FailReason, message: str) -> None:
        """Record the reason (best effort when the run is ending: a storage that refuses leaves
        the trial RUNNING, and the next run records it as crashed)."""
        logger.warning("trial %d failed with %s: %s", trial.number, record.config.describe(), message)
        try:
            replace(record, fail_reason=reason, fail_message=message).write(trial)
        except Exception as err:  # never hide the failure being recorded
            logger.error("could not record why trial %d failed: %s", trial.number, err)

    def _restore(self, trial: Trial) -> None:
        try:
            self.target.restore()
        except AutotuneError as err:
            logger.error("could not restore the baseline after trial %d: %s", trial.number, err)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted ({exc})" if str(exc) else "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return f"interrupted (exit {exc.code})"
    return f"{type(exc).__name__}: {exc}"


def _run_trial(study: optuna.Study, objective: _Objective, url: str) -> FrozenTrial:
    """Ask for a trial, measure it and tell the study its result (FAIL when it failed). If the
    run ends inside (Ctrl-C, an error), the trial is told FAIL, with the reason the objective
    recorded or one from the exception, before the exception goes on."""
    trial = retry_storage(study.ask, "start a trial in", url)
    try:
        values = objective(trial)
        if values is None:
            return retry_storage(lambda: study.tell(trial, state=TrialState.FAIL),
                                 f"record trial {trial.number} as failed in", url)
        return retry_storage(lambda: study.tell(trial, values), f"record trial {trial.number} in", url)
    except BaseException as exc:
        _abandon(trial, exc)
        raise


def _abandon(trial: Trial, exc: BaseException) -> None:
    """Tell a trial the run is leaving FAIL, with a reason (best effort, never raises)."""
    try:
        frozen = trial.study._storage.get_trial(trial._trial_id)
        if frozen.state != TrialState.RUNNING:
            return
        rec = TrialRecord.read(frozen)
        if rec.fail_reason is None:
            replace(rec, fail_reason=_reason_of(exc), fail_message=_describe(exc)).write(trial)
        trial.study.tell(trial, state=TrialState.FAIL)
    except Exception as err:  # the next run records the trial as crashed
        logger.error("could not record the end of trial %d (%s); the next run will", trial.number, err)


def outcome_of(trial: FrozenTrial) -> TrialOutcome:
    """A recorded trial as the observer sees it."""
    rec = TrialRecord.read(trial)
    return TrialOutcome(
        number=trial.number, config=rec.config, baseline=rec.baseline, state=trial.state.name,
        metrics=rec.metrics, feasible=rec.feasible, reason=rec.fail_message or "",
        violations=rec.violations, timings=rec.timings, counts=not rec.drift_check,
    )


def _open_store(spec: StudySpec) -> FileSystemArtifactStore:
    """The trials' artifact store; a folder that cannot be made is one ``ExportError``."""
    path = artifacts_dir(spec)
    try:
        return open_store(path)
    except OSError as exc:
        raise ExportError(f"cannot create the trials' artifact store {path}: "
                          f"{exc.strerror or exc}") from None


def check_faults_supported(target: Target, spec: StudySpec) -> None:
    """Refuse, before anything runs, a spec whose scenarios have service faults the target cannot
    apply (``UnsupportedParameter`` naming the scenarios)."""
    faulty = [s.name for s in spec.scenario_list() if s.faults]
    if faulty and not target.supports_service_faults:
        raise UnsupportedParameter(
            f"scenarios {', '.join(faulty)} have service faults, which the {target.name} target cannot "
            "apply yet; remove their faults or run them on a target that can")


#: Called by ``run_study`` with the study, the started target and the load driver, before the
#: first trial (a scheduled run re-checks the previous recommendation there).
Prelude = Callable[[optuna.Study, Target, LoadDriver], None]


def run_study(spec: StudySpec, observer: Observer | None = None,
              target: Target | None = None, *, load: LoadDriver | None = None,
              prelude: Prelude | None = None) -> optuna.Study:
    """Run (or continue) the spec's study until its trial budget is used.

    The run first takes the study's lease (``StudyBusy`` names the live run holding it) and
    records as ``crashed`` the trials a dead run left RUNNING. The Istio-default baseline is
    measured first. A failed trial is recorded FAIL with its reason, the target is restored and
    the study goes on. On Ctrl-C (KeyboardInterrupt), SIGTERM (as the CLI maps it) or any other
    exception, the trial is recorded FAIL with its reason, the target restored and closed, and
    the exception re-raised; running again resumes. The storage's failures are retried within
    ``RETRY_S`` and then raised as one ``StorageError``. Once the budget is used, which knobs
    mattered is tested and stored (``_effects``), then the front is confirmed as minimal configs.
    ``target`` defaults to the spec's, ``load`` to Locust with the spec's locustfile.
    ``prelude`` runs on the started target before the first trial. The search stops before the
    budget once the front has been flat for ``measurement.stopAfterFlat`` trials (unset: never;
    see ``autotune.study._stop``).
    Writes no files: exports are ``autotune.export``'s job.
    """
    obs = observer or NullObserver()
    store = _open_store(spec)  # before anything is created: a folder that cannot be written stops here
    url = resolve_url(spec.study.storage)
    storage = make_storage(url)
    study = open_study(spec, storage)
    with storage_errors(url, "use"), StudyLease(storage, spec.study.name) as lease:
        fail_crashed_trials(study, lease)
        total = spec.study.trials
        obs.study_started(spec.study.name, counted_trials(study), total)
        if counted_trials(study) >= total:
            return study
        tgt = target or make_target(spec)
        tgt.check_supported(spec.search_space())
        check_faults_supported(tgt, spec)
        driver = load or default_driver(spec)
        if not _has_baseline(study):
            enqueue_baseline(study)
        objective = _Objective(spec, tgt, driver, obs, total, lease.token, url, store)
        tgt.bind_state(StudyState(study))
        after_flat = stop_after_flat(spec)
        try:
            tgt.start()
            if prelude is not None:
                prelude(study, tgt, driver)
            while counted_trials(study) < total:
                if should_stop(study, spec, after_flat):
                    break
                lease.check()
                t = _run_trial(study, objective, url)
                if not TrialRecord.read(t).failed_by_run:
                    obs.trial_finished(outcome_of(t), [outcome_of(p) for p in pareto_trials(study)])
                if counted_trials(study) < total and _drift_check_due(study, spec.measurement.drift_every):
                    enqueue_baseline(study, drift_check=True)
            record_knob_effects(study, spec, seed=spec.study.seed or 0)  # the minimal configs
            confirm_front(study, spec, tgt, obs, load=driver)
        finally:
            tgt.close()
    return study


def run_single(spec: StudySpec, config: MeshConfig, observer: Observer | None = None,
               target: Target | None = None, *, load: LoadDriver | None = None) -> Measurement:
    """Measure one config once (``autotune trial run``) on ``target`` (default: the spec's) under
    ``load`` (default: Locust with the spec's locustfile); the target is closed afterwards."""
    tgt = target or make_target(spec)
    tgt.check_supported([SearchParam(name=n, info=PARAMETERS[n], low=v, high=v)
                         for n, v in config.to_params().items()])
    check_faults_supported(tgt, spec)
    with tgt:
        return measure_config(tgt, spec, config, observer, load=load)
