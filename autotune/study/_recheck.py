"""Re-check first: does the previous run's recommendation still hold on today's service?

Before a scheduled run searches, it measures, interleaved like a confirmation (A B1 B2 … per round,
the order of the Bs reversed every other round; ``max(2, measurement.confirmRounds)`` rounds):
Istio's default A, the config the target runs now (``Target.observed()``; left out when it is
Istio's default, and measured once when it is a previous recommendation), and the previous run's
recommendation and other confirmed configs. Each B's change against the same round's A, with its
confidence interval, is decided as a confirmation decides it (``_confirm``). A previous
recommendation *holds* when it is confirmed again (feasible in every round, an objective improved
beyond its interval) and no objective moved *against* it. An objective *moved* when its interval no
longer overlaps the one the previous run measured (its confirmation, or its own re-check when it
carried the recommendation over) and the two means differ by more than ``measurement.driftThreshold``
(in percentage points of the change against the baseline); it moved *against* the config when it
got worse in the objective's direction. A move in the config's favour (a latency cost that went
away) is reported but does not break the recommendation: it still delivers what it promised. The
baseline's own values are compared with the previous run's (Welch interval of the difference of
the means, in % of the previous mean; *moved* when the interval excludes 0 and the change exceeds
``measurement.driftThreshold``), so a slower service shows even when every config slowed alike.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import optuna
import pydantic
from scipy import stats

from autotune.load import LoadDriver
from autotune.mesh import DEFAULT_CPU_LIMIT, PARAMETERS, MeshConfig, ParamValue
from autotune.spec import StudySpec
from autotune.study._confirm import _decide, _measure
from autotune.study._effects import minimal_config
from autotune.study._front import pareto_trials
from autotune.study._objectives import lookup
from autotune.study._progress import NullObserver, Observer
from autotune.study._record import (
    ObjectiveChange,
    TrialRecord,
    confirmation_of,
    knob_effects_of,
    read_retune_part,
    set_retune_part,
)
from autotune.targets import Observed, Target

logger = logging.getLogger(__name__)
#: The settings ``Target.observed()`` reads back (the rest are compared as written).
_OBSERVED_NAMES = frozenset({"proxy.concurrency", "proxy.cpuLimit", *(
    n for n, p in PARAMETERS.items() if p.field in ("max_connections", "http1_max_pending_requests",
                                                     "http2_max_requests", "max_requests_per_connection",
                                                     "max_retries"))})


class Interval(pydantic.BaseModel):
    """A change in % with its confidence interval."""

    mean_pct: float
    low_pct: float
    high_pct: float

    @classmethod
    def of(cls, change: ObjectiveChange) -> Interval:
        return cls(mean_pct=change.mean_pct, low_pct=change.low_pct, high_pct=change.high_pct)

    def overlaps(self, other: Interval) -> bool:
        return self.low_pct <= other.high_pct and other.low_pct <= self.high_pct

    def text(self) -> str:
        def pct(v: float) -> str:
            return f"{v:+.1f}%" if math.isfinite(v) else ("+inf" if v > 0 else "-inf")

        return f"{pct(self.mean_pct)} [{pct(self.low_pct)}, {pct(self.high_pct)}]"


class Recommendation(pydantic.BaseModel):
    """A recommended config: Istio-named ``params`` (``{}``: Istio's defaults), where it came from
    (``<study>#<trial>``), and whether its run confirmed it."""

    params: dict[str, ParamValue]
    source: str | None = None
    confirmed: bool = False

    @property
    def config(self) -> MeshConfig:
        return MeshConfig.from_params(dict(self.params))


class RecheckedConfig(pydantic.BaseModel):
    """One config of the re-check: its ``roles`` (``applied``, ``previous recommendation``,
    ``previous confirmed``), its change per objective against the baseline now and as the previous
    run measured it, the objectives that ``moved`` (intervals no longer overlap and the means differ by
    more than the drift threshold) and of those the ones that got ``worse``, and for a previous
    recommendation whether it ``holds`` (``None`` for the applied config alone) and why not."""

    params: dict[str, ParamValue]
    roles: list[str]
    source: str | None = None
    rounds: int = 0
    infeasible_rounds: int = 0
    changes: dict[str, Interval] = {}
    before: dict[str, Interval] = {}
    moved: list[str] = []
    worse: list[str] = []
    holds: bool | None = None
    reason: str | None = None

    @property
    def config(self) -> MeshConfig:
        return MeshConfig.from_params(dict(self.params))


class BaselineMove(pydantic.BaseModel):
    """The baseline's value of one objective, previous run vs now (means over their rounds) and
    the change with its Welch interval; ``moved`` when the interval excludes 0 and the change is
    beyond ``measurement.driftThreshold``."""

    metric: str
    before: float
    now: float
    change: Interval
    moved: bool


class Recheck(pydantic.BaseModel):
    """The re-check of a scheduled run (stored as ``retune.recheck``)."""

    previous: str | None
    rounds: int
    confidence: float
    applied_is_baseline: bool
    baseline: dict[str, list[float | None]]
    configs: list[RecheckedConfig]
    baseline_moves: list[BaselineMove] = []

    def recommendation(self) -> RecheckedConfig | None:
        """The previous recommendation as re-checked (``None`` if there was none)."""
        return next((c for c in self.configs if "previous recommendation" in c.roles), None)


def recheck_of(study: optuna.Study) -> Recheck | None:
    """The stored re-check of a run, if any (one this version cannot read is logged and ignored)."""
    return read_retune_part(study, "recheck", Recheck, "re-check")


def applied_config(observed: Observed) -> MeshConfig | None:
    """The config the target runs now as a ``MeshConfig`` (connection-pool fields, concurrency,
    CPU limit: what ``observed()`` reads back), ``None`` when that is Istio's default."""
    if not observed.differences(Observed.expected(MeshConfig())):
        return None
    limit = observed.cpu_limit
    config = replace(observed.pool, cpu_limit=None if limit is None or math.isclose(limit, DEFAULT_CPU_LIMIT)
                     else round(limit, 3), no_cpu_limit=limit is None)
    if observed.concurrency != config.effective_concurrency:
        config = replace(config, concurrency=observed.concurrency)
    return config


def _same(a: MeshConfig, b: MeshConfig) -> bool:
    """The same config: equal settings, or equal once normalized as ``observed()`` reads them
    back (a CPU limit of 2000m is Istio's default, a concurrency equal to the one derived from
    the limit is the default)."""
    return a == b or (a.to_params().keys() - _OBSERVED_NAMES == b.to_params().keys() - _OBSERVED_NAMES
                      and {k: v for k, v in a.to_params().items() if k not in _OBSERVED_NAMES}
                      == {k: v for k, v in b.to_params().items() if k not in _OBSERVED_NAMES}
                      and applied_config(Observed.expected(a)) == applied_config(Observed.expected(b)))


def previous_recommendations(previous: optuna.Study, spec: StudySpec) -> list[Recommendation]:
    """The previous run's recommendation first (its stored outcome's, else the first confirmed
    Pareto config, else the Pareto config with the best first objective), then its other
    confirmed configs, at most ``measurement.confirmMaxConfigs`` in all."""
    from autotune.study._retune import run_outcome_of  # the outcome is decided there

    out: list[Recommendation] = []
    outcome = run_outcome_of(previous)
    if outcome is not None and outcome.recommendation is not None and outcome.recommendation.params:
        out.append(outcome.recommendation)
    confirmation = confirmation_of(previous)
    by_number = {t.number: t for t in previous.get_trials(deepcopy=False)}
    confirmed = [n for n in (confirmation.trials if confirmation else [])
                 if confirmation is not None and confirmation.results[n].confirmed and n in by_number]
    front = [t.number for t in pareto_trials(previous) if not TrialRecord.read(t).baseline]
    if outcome is None and not confirmed and front:
        confirmed = front[:1]  # an unconfirmed recommendation is still what the run recommended
    effects = knob_effects_of(previous)
    for n in confirmed:  # as confirmed: the minimal config
        params = minimal_config(TrialRecord.read(by_number[n]).config, effects)[0].to_params()
        if not any(_same(MeshConfig.from_params(params), r.config) for r in out):
            out.append(Recommendation(params=params, source=f"{previous.study_name}#{n}",
                                      confirmed=confirmation is not None and n in confirmation.results
                                      and confirmation.results[n].confirmed))
    return out[: spec.measurement.confirm_max_configs]


def _before(previous: optuna.Study, config: MeshConfig) -> dict[str, Interval]:
    """The changes the previous run measured for ``config``: its confirmation, else its re-check."""
    confirmation = confirmation_of(previous)
    if confirmation is not None:
        by_number = {t.number: t for t in previous.get_trials(deepcopy=False)}
        effects = knob_effects_of(previous)
        for n, result in confirmation.results.items():
            if n in by_number and result.changes and _same(
                    minimal_config(TrialRecord.read(by_number[n]).config, effects)[0], config):
                return {m: Interval.of(c) for m, c in result.changes.items()}
    earlier = recheck_of(previous)
    for c in earlier.configs if earlier else []:
        if _same(c.config, config) and c.changes:
            return dict(c.changes)
    return {}


def _before_baseline(previous: optuna.Study, spec: StudySpec) -> dict[str, list[float]]:
    """The baseline's values per objective in the previous run: its confirmation rounds, else its
    re-check rounds, else its baseline trials."""
    first = spec.scenario_list()[0].name
    out: dict[str, list[float]] = {}
    confirmation, earlier = confirmation_of(previous), recheck_of(previous)
    for o in spec.objectives:
        rounds = (confirmation.baseline.get(o.metric) if confirmation else None) or \
            (earlier.baseline.get(o.metric) if earlier else None) or []
        values = [v for v in rounds if v is not None and math.isfinite(v)]
        if len(values) < 2:
            base = [t for t in previous.get_trials(deepcopy=False) if TrialRecord.read(t).baseline
                    and t.state == optuna.trial.TrialState.COMPLETE]
            values = [v for t in base if math.isfinite(v := lookup(TrialRecord.read(t).metrics, o.metric, first))]
        out[o.metric] = values
    return out


def moved_beyond(before: Interval, now: Interval, threshold_pct: float) -> bool:
    """Whether a change against the baseline moved: the intervals no longer overlap and the means
    differ by more than ``threshold_pct`` percentage points (two narrow intervals a few points
    apart are a difference nobody acts on)."""
    return not now.overlaps(before) and abs(now.mean_pct - before.mean_pct) > threshold_pct


def _worse(before: Interval, now: Interval, direction: str) -> bool:
    """Whether ``now`` is worse than ``before`` for an objective to ``direction``."""
    return now.mean_pct > before.mean_pct if direction == "minimize" else now.mean_pct < before.mean_pct


def welch_change(before: list[float], now: list[float], confidence: float) -> Interval:
    """(mean(now) − mean(before)) / mean(before) in %, with a Welch-t interval (unbounded with
    fewer than 2 values on a side)."""
    a, b = np.asarray(before, dtype=float), np.asarray(now, dtype=float)
    if a.size == 0 or b.size == 0 or a.mean() == 0:
        return Interval(mean_pct=math.nan, low_pct=-math.inf, high_pct=math.inf)
    mean = float((b.mean() - a.mean()) / abs(a.mean()) * 100)
    if a.size < 2 or b.size < 2:
        return Interval(mean_pct=mean, low_pct=-math.inf, high_pct=math.inf)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(mean_pct=mean, low_pct=mean, high_pct=mean)
    df = (va + vb) ** 2 / ((va**2 / (a.size - 1) if a.size > 1 else 0) + (vb**2 / (b.size - 1) if b.size > 1 else 0))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se / abs(a.mean()) * 100
    return Interval(mean_pct=mean, low_pct=mean - half, high_pct=mean + half)


def recheck(study: optuna.Study, spec: StudySpec, target: Target, previous: optuna.Study | None,
            observer: Observer | None = None, *, load: LoadDriver) -> Recheck:
    """Measure, on the started ``target``, the baseline, the applied config and the previous
    run's recommendations in interleaved rounds; decide whether each recommendation holds; store
    the result on ``study`` (``retune.recheck``) and return it. The target is left at the baseline."""
    obs = observer or NullObserver()
    applied = applied_config(target.observed())
    entries: list[RecheckedConfig] = []
    recs = previous_recommendations(previous, spec) if previous is not None else []
    for i, rec in enumerate(recs):
        entries.append(RecheckedConfig(params=rec.params, source=rec.source,
                                       roles=["previous recommendation" if i == 0 else "previous confirmed"]))
    if applied is not None:
        same = next((e for e in entries if _same(e.config, applied)), None)
        if same is not None:
            same.roles.append("applied")
        else:
            entries.insert(0, RecheckedConfig(params=applied.to_params(), roles=["applied"]))
    rounds = max(2, spec.measurement.confirm_rounds)
    metrics = [o.metric for o in spec.objectives]
    runs: dict[int, list[dict[str, float] | None]] = {i: [] for i in range(-1, len(entries))}
    if entries:
        total, step = rounds * (len(entries) + 1), 0
        order = list(enumerate(entries))
        for r in range(rounds):
            for i, e in [(-1, None), *(order if r % 2 == 0 else order[::-1])]:
                config = MeshConfig() if e is None else e.config
                step += 1
                obs.trial_started(-1, step, total, config, e is None, stage="recheck")
                runs[i].append(_measure(target, spec, config, obs, load))
        target.restore()
    first = spec.scenario_list()[0].name
    directions = {o.metric: o.direction for o in spec.objectives}
    baseline = {m: [lookup(r, m, first) if r else None for r in runs[-1]] for m in metrics}
    for i, e in enumerate(entries):
        decided = _decide(spec, -1, runs[-1], runs[i], metrics)
        e.rounds, e.infeasible_rounds = decided.rounds, decided.infeasible_rounds
        e.changes = {m: Interval.of(c) for m, c in decided.changes.items()}
        if previous is not None and e.source is not None:
            e.before = _before(previous, e.config)
        e.moved = [m for m in metrics if m in e.changes and m in e.before
                   and moved_beyond(e.before[m], e.changes[m], 100 * spec.measurement.drift_threshold)]
        e.worse = [m for m in e.moved if _worse(e.before[m], e.changes[m], directions[m])]
        if e.source is not None:
            e.holds = decided.confirmed and not e.worse
            e.reason = decided.reason or (f"worse beyond its interval: {', '.join(e.worse)}" if e.worse else None)
        logger.info("re-check of %s (%s): %s", e.config.describe(), ", ".join(e.roles),
                    "holds" if e.holds else (e.reason or "measured"))
    moves = []
    if previous is not None and entries:
        before = _before_baseline(previous, spec)
        threshold = 100 * spec.measurement.drift_threshold
        for m in metrics:
            now = [v for v in baseline[m] if v is not None and math.isfinite(v)]
            if before.get(m) and now:
                change = welch_change(before[m], now, spec.measurement.confidence)
                beyond = change.low_pct > 0 or change.high_pct < 0
                moves.append(BaselineMove(metric=m, before=float(np.mean(before[m])), now=float(np.mean(now)),
                                          change=change, moved=beyond and abs(change.mean_pct) > threshold))
    result = Recheck(previous=previous.study_name if previous is not None else None, rounds=rounds if entries else 0,
                     confidence=spec.measurement.confidence, applied_is_baseline=applied is None,
                     baseline=baseline, configs=entries, baseline_moves=moves)
    set_retune_part(study, "recheck", result.model_dump(mode="json"))
    return result


def baseline_values(result: Recheck) -> dict[str, list[float]]:
    """The re-check's baseline rounds per objective (finite values), for the noise estimate."""
    return {m: [v for v in vals if v is not None and math.isfinite(v)] for m, vals in result.baseline.items()}


