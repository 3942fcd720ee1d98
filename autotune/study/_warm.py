"""Warm start: seed a run's sampler with the configs the previous run found best.

The previous run's feasible Pareto configs, then the best ``BEST_PER_OBJECTIVE`` feasible configs
of each objective, are queued (``Study.enqueue_trial``) as the run's first trials after the
baseline — re-measured on today's service, never copied. A config is carried when its knobs still
fit the search space: every setting it has is a parameter of the space, within the new range (on
its step; a ``choice`` among the new choices; ``unset`` only where the space allows it). Parameters
of the space the config does not set are left to the sampler. At most half the budget (less the
baseline) is carried, so the rest goes to new configs. What was carried and what was dropped, and
why, is stored on the run (``retune.warm_start``) for its report.
"""

from __future__ import annotations

import logging
import math

import optuna
import pydantic
from optuna.trial import FrozenTrial, TrialState

from autotune.mesh import NO_LIMIT, MeshConfig, ParamValue
from autotune.spec import SearchParam, StudySpec
from autotune.study._front import best_first, pareto_trials
from autotune.study._record import (
    TrialRecord,
    enqueue_carried,
    is_feasible,
    read_retune_part,
    set_retune_part,
)

logger = logging.getLogger(__name__)
#: Besides the front, the best this many feasible configs of each objective are carried.
BEST_PER_OBJECTIVE = 2


class CarriedConfig(pydantic.BaseModel):
    """A config of an earlier run: where from (``<study>#<trial>``), its Istio-named settings,
    and either the parameters the sampler fills in (carried) or why it was dropped."""

    source: str
    params: dict[str, ParamValue]
    sampled: list[str] = []
    reason: str | None = None

    @property
    def describe(self) -> str:
        return MeshConfig.from_params(dict(self.params)).describe()


class WarmStart(pydantic.BaseModel):
    """What a run carried from ``previous`` (stored as ``retune.warm_start``)."""

    previous: str | None
    spec_hash_matched: bool
    carried: list[CarriedConfig] = []
    dropped: list[CarriedConfig] = []


def warm_start_of(study: optuna.Study) -> WarmStart | None:
    """The stored warm start of a run, if any."""
    return read_retune_part(study, "warm_start", WarmStart, "warm start")


def candidates(previous: optuna.Study) -> list[FrozenTrial]:
    """The previous run's feasible front (not the baseline), then the best feasible configs of each
    objective; each config once."""
    done = [t for t in previous.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and is_feasible(t) and not TrialRecord.read(t).baseline]
    picked = [t for t in pareto_trials(previous) if not TrialRecord.read(t).baseline]
    for i in range(len(previous.directions)):
        picked += best_first(done, previous.directions, i)[:BEST_PER_OBJECTIVE]
    seen: set[MeshConfig] = set()
    out = []
    for t in picked:
        config = TrialRecord.read(t).config
        if config not in seen:
            seen.add(config)
            out.append(t)
    return out


def _on_step(value: float, p: SearchParam) -> bool:
    if not p.step:
        return True
    k = (value - p.low) / p.step
    return math.isclose(k, round(k), abs_tol=1e-6)


def fit(config: MeshConfig, space: list[SearchParam]) -> tuple[dict[str, object], list[str], str | None]:
    """``config`` as the Optuna parameters of ``space`` (as ``suggest`` names them), the space's
    parameters it leaves to the sampler, and why it does not fit (``None`` when it does)."""
    params = config.to_params()
    names = {p.name for p in space}
    extra = [n for n in params if n not in names]
    if extra:
        return {}, [], f"sets {', '.join(extra)}, which the search space no longer has"
    out: dict[str, object] = {}
    sampled = []
    for p in space:
        value = params.get(p.name)
        if value is None:
            sampled.append(p.name)
            continue
        if p.info.kind == "choice":
            if value not in p.choices:
                return {}, [], f"{p.name}={value} is not among the choices {', '.join(p.choices)}"
            out[p.name] = value
            continue
        if value == NO_LIMIT:
            if not p.unset:
                return {}, [], f"{p.name} is unset, which the search space no longer allows"
            out[f"{p.name}:unset"] = True
            continue
        number = float(value)
        if not (p.low - 1e-9 <= number <= p.high + 1e-9) or not _on_step(number, p):
            return {}, [], f"{p.name}={value} is outside the new range {p.low:g}..{p.high:g}" + (
                f" (step {p.step:g})" if p.step else "")
        if p.unset:
            out[f"{p.name}:unset"] = False
        out[p.name] = number if p.info.kind == "cpu" else int(number)
    return out, sampled, None


def warm_start(study: optuna.Study, spec: StudySpec, previous: optuna.Study | None, *, hash_matched: bool) -> WarmStart:
    """Queue the previous run's best configs that fit the spec's space on ``study`` (after its
    baseline), record what was carried and dropped, and return it."""
    result = WarmStart(previous=previous.study_name if previous else None, spec_hash_matched=hash_matched)
    if previous is None:
        set_retune_part(study, "warm_start", result.model_dump(mode="json"))
        return result
    room = max(1, (spec.study.trials - 1) // 2)
    space = spec.search_space()
    for t in candidates(previous):
        config = TrialRecord.read(t).config
        entry = CarriedConfig(source=f"{previous.study_name}#{t.number}", params=config.to_params())
        params, sampled, reason = fit(config, space)
        if reason is None and len(result.carried) >= room:
            reason = f"the budget keeps room for new configs: at most {room} are carried"
        if reason is not None:
            result.dropped.append(entry.model_copy(update={"reason": reason}))
            continue
        enqueue_carried(study, params, entry.source)
        result.carried.append(entry.model_copy(update={"sampled": sampled}))
    logger.info("warm start from %s: %d config(s) carried, %d dropped", previous.study_name,
                len(result.carried), len(result.dropped))
    for d in result.dropped:
        logger.info("not carried: %s (%s): %s", d.source, d.describe, d.reason)
    set_retune_part(study, "warm_start", result.model_dump(mode="json"))
    return result
