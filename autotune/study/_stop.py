"""Stop when done: the search ends before its budget once the feasible front stops growing.

Optuna's terminator is single-objective (and deprecated), so the rule is written here, on the
noise autotune already measures:

- every objective is normalized by the run's baseline (Istio's default, trial 0): a minimized
  value ``v`` becomes ``v / b``, a maximized one ``b / v``; the hypervolume is taken against the
  reference point ``REF_FACTOR`` × the baseline on every objective (as ``bench/search_efficiency.py``
  does for the recorded landscape), so a config worse than twice the baseline adds nothing;
- the front has *not grown beyond the noise* since trial j when the hypervolume after trial j
  already reaches the hypervolume of today's front with every point made worse by its noise (each
  normalized objective times 1 + its relative noise): what was found since, the noise alone could
  explain;
- the noise of an objective is the pooled relative spread (standard deviation over mean) of the
  configs measured more than once: the baseline (its first measurement, drift re-measurements,
  and a scheduled run's re-check rounds, ``retune.stop``) and any config the search measured
  again (trials stopped by an early abort left out); without a repeated config, the median over
  the trials of two or more windows of their windows' spread (``spread_cv``) over the square root
  of the windows; without either, ``DEFAULT_NOISE``; ``MIN_NOISE`` for an objective the config
  fixes (``DETERMINISTIC``: the CPU limit or request) and as a floor;
- the run stops once ``measurement.stopAfterFlat`` trials (counted trials: completed, or failed
  for a reason of the config; not the warm start's re-measurements of earlier configs, nor while
  some are still queued) came after that point.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
import pydantic
from optuna.trial import FrozenTrial, TrialState

from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study._objectives import lookup
from autotune.study._record import TrialRecord, is_feasible, read_retune_part, set_retune_part

logger = logging.getLogger(__name__)
#: ``study run-scheduled`` stops after this many flat trials when the spec does not say.
DEFAULT_STOP_AFTER_FLAT = 5
#: The reference point, in multiples of the baseline on every objective.
REF_FACTOR = 2.0
#: The least relative noise assumed for an objective (a deterministic one, e.g. the CPU limit,
#: would otherwise count a 1m step as growth).
MIN_NOISE = 0.01
#: The noise assumed for a measured objective before any estimate exists (no config measured
#: twice, one window per trial): about a p95's spread between measurements on a shared machine.
DEFAULT_NOISE = 0.05
#: Objectives fixed by the config (not measured): their noise is ``MIN_NOISE``.
DETERMINISTIC = frozenset({"cpu_limit_cores", "cpu_requested_cores", "cpu_reserved_cores"})


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """The volume dominated by ``points`` (every coordinate minimized) and bounded by ``ref``;
    exact, by slicing along the first coordinate (fronts here have tens of points)."""
    pts = sorted(tuple(p) for p in points if all(x < r for x, r in zip(p, ref, strict=True)))
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - pts[0][0]
    total = 0.0
    for i, p in enumerate(pts):
        upto = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        if upto > p[0]:
            total += (upto - p[0]) * hypervolume([q[1:] for q in pts[: i + 1]], ref[1:])
    return total


class _StopJSON(pydantic.BaseModel):
    """What a scheduled run stores for the rule (``retune.stop``) and what the rule found."""

    baseline_values: dict[str, list[float]] = {}
    after_flat: int = 0
    noise: dict[str, float] = {}
    stopped_after: int | None = None
    flat: int = 0


@dataclass(frozen=True)
class FrontProgress:
    """Where the rule stands: ``flat`` counted trials in a row without growth, out of
    ``counted``; ``noise`` per objective (relative) and ``hypervolume`` (normalized) so far."""

    flat: int
    counted: int
    noise: dict[str, float]
    hypervolume: float


def _stored(study: optuna.Study) -> _StopJSON:
    return read_retune_part(study, "stop", _StopJSON, "stop rule") or _StopJSON()


def store_baseline_values(study: optuna.Study, values: Mapping[str, Sequence[float]]) -> None:
    """Add repeated baseline measurements (per objective) measured outside the study's trials
    (the re-check rounds, the previous run's confirmation) to what the noise is derived from."""
    data = _stored(study)
    merged = {k: list(v) for k, v in data.baseline_values.items()}
    for metric, vals in values.items():
        merged.setdefault(metric, []).extend(float(v) for v in vals if math.isfinite(v))
    set_retune_part(study, "stop", data.model_copy(update={"baseline_values": merged}).model_dump())


def _counted(trial: FrozenTrial) -> bool:
    rec = TrialRecord.read(trial)
    if rec.drift_check:
        return False
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and rec.fail_reason is not None and rec.fail_reason.counts)


def noise(study: optuna.Study, spec: StudySpec) -> dict[str, float]:
    """Each objective's relative measurement noise (see the module docstring)."""
    first = spec.scenario_list()[0].name
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    stored = _stored(study).baseline_values
    out: dict[str, float] = {}
    for o in spec.objectives:
        if o.metric.rpartition(".")[2] in DETERMINISTIC:
            out[o.metric] = MIN_NOISE
            continue
        groups: dict[MeshConfig, list[float]] = {}
        for t in trials:
            rec = TrialRecord.read(t)
            if rec.aborted_after is None:
                groups.setdefault(MeshConfig() if rec.baseline else rec.config, []).append(
                    lookup(rec.metrics, o.metric, first))
        groups.setdefault(MeshConfig(), []).extend(stored.get(o.metric, []))
        spread = _pooled_cv(list(groups.values()))
        if spread is None:
            spread = _window_noise(trials, o.metric, first)
        out[o.metric] = max(MIN_NOISE, DEFAULT_NOISE if spread is None else spread)
    return out


def _pooled_cv(groups: Sequence[Sequence[float]]) -> float | None:
    """The pooled relative spread of repeated measurements (each group one config); ``None``
    without a config measured twice."""
    num = den = 0.0
    for values in groups:
        arr = np.array([v for v in values if math.isfinite(v)], dtype=float)
        if arr.size >= 2 and arr.mean() != 0:
            num += float(((arr / abs(arr.mean()) - np.sign(arr.mean())) ** 2).sum())
            den += arr.size - 1
    return math.sqrt(num / den) if den else None


def _window_noise(trials: Sequence[FrozenTrial], metric: str, first: str) -> float | None:
    """The median over trials of two or more windows of their windows' spread of ``metric``
    over √windows (``None`` without such a trial)."""
    names = (metric, f"{first}.{metric}")  # spread_cv names the first scenario's both ways
    per_trial = []
    for t in trials:
        rec = TrialRecord.read(t)
        cv = next((rec.spread_cv[n] for n in names if n in rec.spread_cv), None)
        if cv is not None and math.isfinite(cv) and len(rec.windows) >= 2:
            per_trial.append(cv / math.sqrt(len(rec.windows)))
    return float(np.median(per_trial)) if per_trial else None


def _normalizer(study: optuna.Study, spec: StudySpec, trials: Sequence[FrozenTrial]) -> list[float]:
    """Each objective's scale: the first baseline's value, else the largest magnitude seen, else 1."""
    first = spec.scenario_list()[0].name
    base = next((t for t in trials if TrialRecord.read(t).baseline and t.state == TrialState.COMPLETE), None)
    scales = []
    for i, o in enumerate(spec.objectives):
        b = lookup(TrialRecord.read(base).metrics, o.metric, first) if base is not None else math.nan
        if not (math.isfinite(b) and b > 0):
            seen = [abs(t.values[i]) for t in trials if t.values is not None and math.isfinite(t.values[i])]
            b = max(seen) if seen and max(seen) > 0 else 1.0
        scales.append(b)
    return scales


def _normalized(values: Sequence[float], scales: Sequence[float], maximize: Sequence[bool]) -> list[float]:
    out = []
    for v, b, up in zip(values, scales, maximize, strict=True):
        if up:
            out.append(b / v if v > 0 else math.inf)
        else:
            out.append(v / b)
    return out


def progress(study: optuna.Study, spec: StudySpec) -> FrontProgress:
    """How many counted trials, up to the latest, the hypervolume has not grown beyond the noise
    for: the trials (not warm-start re-measurements, see ``_warm``) since the earliest point at
    which the hypervolume already reached that of today's front with every point made worse by
    its noise (see the module docstring)."""
    trials = [t for t in study.get_trials(deepcopy=False) if _counted(t)]
    maximize = [o.direction == "maximize" for o in spec.objectives]
    scales = _normalizer(study, spec, trials)
    rel = noise(study, spec)
    factors = [1.0 + rel[o.metric] for o in spec.objectives]
    ref = [REF_FACTOR] * len(spec.objectives)
    front: list[list[float]] = []
    curve = []  # the hypervolume after each counted trial
    for t in trials:
        if t.state == TrialState.COMPLETE and t.values is not None and is_feasible(t):
            front.append(_normalized(t.values, scales, maximize))
        curve.append(hypervolume(front, ref))
    hv = curve[-1] if curve else 0.0
    floor = hypervolume([[x * f for x, f in zip(p, factors, strict=True)] for p in front], ref)
    reached = next((i for i, v in enumerate(curve) if v > 0 and v >= floor - 1e-12), len(curve))
    flat = sum(1 for t in trials[reached + 1:] if TrialRecord.read(t).carried_from is None)
    return FrontProgress(flat=flat, counted=len(trials), noise=rel, hypervolume=hv)


def stop_after_flat(spec: StudySpec, default: int = 0) -> int:
    """The spec's ``measurement.stopAfterFlat``, or ``default`` when unset (0: never stop early)."""
    value = spec.measurement.stop_after_flat
    return default if value is None else value


def should_stop(study: optuna.Study, spec: StudySpec, after_flat: int) -> bool:
    """Whether the search is done: ``after_flat`` > 0 and the front has been flat that long.
    Records the state (``retune.stop``) and logs the decision when it stops."""
    if after_flat <= 0 or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return False
    state = progress(study, spec)
    if state.flat < after_flat:
        return False
    data = _stored(study).model_copy(update={
        "after_flat": after_flat, "noise": {k: round(v, 4) for k, v in state.noise.items()},
        "stopped_after": state.counted, "flat": state.flat})
    set_retune_part(study, "stop", data.model_dump())
    noise_text = ", ".join(f"{m} ±{100 * v:.1f}%" for m, v in state.noise.items())
    logger.info("stopping early after %d of %d trials: the feasible front has not grown beyond the "
                "measurement noise (%s) for %d trials", state.counted, spec.study.trials, noise_text, state.flat)
    return True


@dataclass(frozen=True)
class StopRecord:
    """Whether and when a study stopped early (``stopped_after`` counted trials), the rule's
    ``after_flat`` and the noise it used."""

    stopped_after: int | None
    after_flat: int
    noise: dict[str, float]
    flat: int


def stop_record(study: optuna.Study) -> StopRecord:
    """What :func:`should_stop` recorded (``stopped_after`` is ``None`` when the run used its budget)."""
    data = _stored(study)
    return StopRecord(stopped_after=data.stopped_after, after_flat=data.after_flat, noise=dict(data.noise),
                      flat=data.flat)
