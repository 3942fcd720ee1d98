"""Which knobs matter: one verdict per searched parameter, calibrated on the study's own noise.

What is promised
----------------
Every searched parameter (knob) is tested against every metric of the *family*: each objective
and each scenario's constraint metrics (``error_rate``, ``throughput_ratio``), all named
``<scenario>.<metric>``. The null hypothesis of one test is "the knob has no effect on the metric
once the other knobs are accounted for". A knob **matters** when at least one of its tests is
rejected, and the verdict names where (which ``<scenario>.<metric>``). The whole table — every
knob against every metric — keeps a family-wise error rate of at most ``alpha``
(``1 - measurement.confidence``, the confidence of the confirmation intervals): when no knob has
any effect, the chance that the table flags one or more is at most ``alpha``. "No detected
effect" is not proof of no effect: an effect smaller than what the study's trials and noise can
resolve goes undetected, which is why the confirmation round measures the minimal config.

Data
----
The completed trials that are not baseline measurements, feasible or not (an infeasible trial's
metrics are what its config did: a knob that breaks a constraint matters); for each metric, the
trials where it was measured (an early abort leaves the skipped scenarios unmeasured; the
placeholder objective values of an aborted trial are never used). Failed trials have no
metrics and are left out: a knob whose only effect is to make trials fail is not detected here
(``trials.csv`` lists the failures and their reasons). Baseline measurements are left out too:
their settings are Istio's defaults, often far outside the searched ranges.

The test
--------
Model: the *ranks* of the metric (so a starved config at 300 ms weighs as one rank, not as a
hundred noisy ones) against an additive model of the knobs: a numeric knob by the rank of its
value and the square of that rank (a U-shape counts), a ``choice`` one-hot, a CPU limit that
may be unset by its effective value (the node's CPUs when unset). The statistic of knob k on
metric m is the partial F of k's columns given the other knobs' columns (``conditional``): a
knob that the sampler moved together with an effective one is judged on what it adds. With too
few trials for that (fewer residual degrees of freedom than the model has columns) the model
drops the squares (``conditional-linear``), and with fewer than ``MIN_RESIDUAL_DF`` left then,
the other knobs (``marginal``: each knob alone). These fallbacks fit an effective knob's curve
less well, so a knob the sampler moved together with it is a little more often flagged with it.

Null distribution: Freedman–Lane permutations (Anderson & Legendre 1999; Winkler et al. 2014):
the residuals of the model without k are permuted across the trials and added back to its fit,
``permutations`` times; tests on the same trials share the same permutations. The scatter of the
metric that the knobs do not explain — the measurement noise and the drift of the machine, as
this study measured them — is what calibrates every test; nothing assumes a noise level.

Multiple comparisons: single-step maxT (Westfall & Young 1993) over the whole table, on the
statistic ``-log p`` of the F distribution (which puts tests with different degrees of freedom
on one scale; the permutations, not the F distribution, give the p-values): a test's adjusted p
is the share of permutations whose largest statistic over the table reaches the test's. Tests
on different trial sets (scenarios skipped by early aborts) are permuted independently, which
makes the adjustment conservative. The smallest adjusted p is ``1 / (permutations + 1)``.

Effect size: the partial R² on ranks, the share of the metric's rank variance left by the other
knobs that this knob explains (0–1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats

from autotune.mesh import PARAMETERS, MeshConfig
from autotune.spec import StudySpec
from autotune.study._objectives import lookup, rules_of, split
from autotune.study._record import (
    KnobEffects,
    KnobTest,
    KnobVerdict,
    TrialRecord,
    set_knob_effects,
)

logger = logging.getLogger(__name__)
#: Permutations of each test's null distribution.
PERMUTATIONS = 2000
#: Residual degrees of freedom a model must leave (else a simpler model is used).
MIN_RESIDUAL_DF = 4
#: Fewest trials a metric must have been measured on to be tested.
MIN_TRIALS = 6
#: Fewest analysed trials per searched knob before a minimal config leaves any knob out: with
#: fewer, the test misses real effects too often (measured on a replayed landscape with 5 knobs:
#: each acting knob found in ~42 % of 11-trial studies, 90 % of 29-trial ones), and resetting a
#: knob that mattered would throw away what the study found.
MIN_TRIALS_PER_KNOB = 4
_FloatArray = np.ndarray[tuple[int, ...], np.dtype[np.float64]]
_IntArray = np.ndarray[tuple[int, ...], np.dtype[np.int64]]


def effect_metrics(spec: StudySpec) -> list[str]:
    """The family of metrics each knob is tested on, as ``<scenario>.<metric>``: the objectives,
    then each scenario's constraint metrics (``error_rate``, ``throughput_ratio``, and
    ``cpu_throttled_ratio`` where ``maxThrottledRatio`` is set)."""
    first = spec.scenario_list()[0].name
    out: list[str] = []
    for o in spec.objectives:
        scenario, name = split(o.metric)
        out.append(f"{scenario or first}.{name}")
    out += [f"{s.name}.{rule}" for s in spec.scenario_list() for rule in rules_of(s)]
    return list(dict.fromkeys(out))


def minimal_config(config: MeshConfig, effects: KnobEffects | None) -> tuple[MeshConfig, list[str]]:
    """``config`` with every knob tested with no detected effect left out (so Istio's default
    applies, and the manifests do not write it), and the names of the knobs left out. Knobs
    that matter, and knobs that could not be tested, keep their value; without ``effects``, or
    with fewer than ``MIN_TRIALS_PER_KNOB`` analysed trials per knob (``can_reset``), the config
    is returned as it is."""
    if effects is None or not can_reset(effects):
        return config, []
    params = config.to_params()
    reset = [name for name in effects.null_knobs if name in params]
    if not reset:
        return config, []
    return MeshConfig.from_params({k: v for k, v in params.items() if k not in reset}), reset


def can_reset(effects: KnobEffects) -> bool:
    """Whether the study analysed enough trials (``MIN_TRIALS_PER_KNOB`` per knob) for a minimal
    config to leave out the knobs with no detected effect."""
    return effects.trials >= MIN_TRIALS_PER_KNOB * len(effects.verdicts)


def knob_effects(study: optuna.Study, spec: StudySpec, *, permutations: int = PERMUTATIONS,
                 seed: int = 0) -> KnobEffects | None:
    """The verdict on each parameter of the spec's search space from the study's trials (see
    the module docstring for the rule and what it promises); ``None`` when no metric could be
    tested (too few trials). Deterministic for a given ``seed``."""
    knobs = [p.name for p in spec.search_space()]
    configs, metrics = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.read(t)
        if rec.baseline or any(_value(rec.config, k) is None for k in knobs):
            continue  # a trial from before a knob was added to the space has no value for it
        configs.append(rec.config)
        metrics.append(rec.metrics)
    return analyse(knobs, configs, metrics, effect_metrics(spec), first=spec.scenario_list()[0].name,
                   alpha=round(1.0 - spec.measurement.confidence, 6), permutations=permutations,
                   seed=seed)


def record_knob_effects(study: optuna.Study, spec: StudySpec, *, seed: int = 0) -> KnobEffects | None:
    """Compute the verdicts (``knob_effects``), store them on the study and log them in one line;
    ``None`` (and nothing stored) when no metric could be tested."""
    effects = knob_effects(study, spec, seed=seed)
    if effects is None:
        logger.info("which knobs matter: too few measured trials to test any (at least %d)", MIN_TRIALS)
        return None
    set_knob_effects(study, effects)
    found = [f"{v.parameter} ({', '.join(v.where)})" for v in effects.verdicts if v.matters]
    logger.info("knobs with an effect beyond the noise (family-wise alpha %.2f, %d trials): %s; none "
                "detected for: %s", effects.alpha, effects.trials, "; ".join(found) or "none",
                ", ".join(effects.null_knobs) or "none")
    return effects


def analyse(knobs: Sequence[str], configs: Sequence[MeshConfig], metrics: Sequence[Mapping[str, float]],
            names: Sequence[str], *, first: str, alpha: float, permutations: int = PERMUTATIONS,
            seed: int = 0) -> KnobEffects | None:
    """The verdicts of ``knobs`` on the metrics ``names`` (``<scenario>.<metric>``; ``first`` is the
    first scenario, whose metrics may be stored unprefixed) from one measurement per trial:
    ``configs[i]`` measured ``metrics[i]``. ``None`` when no metric could be tested."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, ...], list[tuple[str, _FloatArray]]] = {}
    for name in names:
        y = np.array([lookup(m, name, first) for m in metrics], dtype=float)
        rows = np.flatnonzero(np.isfinite(y))
        if rows.size < MIN_TRIALS or np.ptp(y[rows]) == 0:
            continue  # too few trials, or nothing to explain (e.g. no error in any trial)
        groups.setdefault(tuple(int(i) for i in rows), []).append((name, y[rows]))
    if not groups:
        return None
    tests: list[tuple[str, str, float, _FloatArray]] = []
    models: dict[str, str] = {}
    for trials, members in groups.items():
        sub = [configs[i] for i in trials]
        model, designs = _designs(knobs, sub)
        perms = np.vstack([np.arange(len(sub)), *(rng.permutation(len(sub)) for _ in range(permutations))])
        for name, y in members:
            models[name] = model
            ranks = stats.rankdata(y)
            for knob, design in designs.items():
                effect, stat = _freedman_lane(ranks, design, perms)
                tests.append((knob, name, effect, stat))
    table = np.vstack([t[3] for t in tests]) if tests else np.zeros((0, permutations + 1))
    most = table[:, 1:].max(axis=0) if tests else np.zeros(permutations)
    adjusted = [(1 + int(np.sum(most >= stat[0]))) / (permutations + 1) for *_, stat in tests]
    verdicts = []
    for knob in knobs:
        own = sorted((KnobTest(m, round(e, 4), round(p, 5))
                      for (k, m, e, _), p in zip(tests, adjusted, strict=True) if k == knob),
                     key=lambda t: (t.p_value, -t.effect))
        where = [t.metric for t in own if t.p_value <= alpha]
        verdicts.append(KnobVerdict(knob, bool(where), where, own))
    return KnobEffects(alpha=alpha, permutations=permutations, trials=len(configs), models=models,
                       verdicts=verdicts)


@dataclass(frozen=True)
class _Design:
    """One knob's test: orthonormal bases of the model without it (``reduced``) and with it
    (``full``), and the F test's degrees of freedom."""

    reduced: _FloatArray
    full: _FloatArray
    df1: int
    df2: int


def _value(config: MeshConfig, knob: str) -> float | str | None:
    """The knob's value in a config (a CPU limit: its effective cores, the node's CPUs unset)."""
    if knob == "proxy.cpuLimit":
        return config.effective_cpu_limit
    value: float | str | None = getattr(config, PARAMETERS[knob].field)
    return value


def _columns(knob: str, configs: Sequence[MeshConfig], degree: int) -> _FloatArray:
    """The knob's columns: one-hot for a choice (first level dropped), else the centred rank of its
    value and, with ``degree`` 2, the centred square of that rank."""
    values = [_value(c, knob) for c in configs]
    if PARAMETERS[knob].kind == "choice":
        levels = sorted({str(v) for v in values})
        cols = [[float(str(v) == level) for v in values] for level in levels[1:]]
        return np.array(cols, dtype=float).T if cols else np.zeros((len(values), 0))
    rank = stats.rankdata(np.array(values, dtype=float)) / len(values)
    rank -= rank.mean()
    cols = [rank] if degree == 1 else [rank, rank**2 - (rank**2).mean()]
    return np.array(cols, dtype=float).T


def _basis(n: int, *blocks: _FloatArray) -> _FloatArray:
    """An orthonormal basis of the span of an intercept and ``blocks``' columns (``n`` rows)."""
    x = np.hstack([np.ones((n, 1)), *blocks])
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    keep: _FloatArray = u[:, s > s[0] * max(x.shape) * 1e-10]
    return keep


def _designs(knobs: Sequence[str], configs: Sequence[MeshConfig]) -> tuple[str, dict[str, _Design]]:
    """The richest model the trials allow (see the module docstring) and each testable knob's
    design (a knob whose columns add nothing, e.g. a value that never varied, is left out).
    The squares are kept while the trials leave at least as many residual degrees of freedom as
    the model has columns; the ranks alone while they leave ``MIN_RESIDUAL_DF``."""
    n = len(configs)
    for degree, model in ((2, "conditional"), (1, "conditional-linear")):
        cols = {k: _columns(k, configs, degree) for k in knobs}
        full = _basis(n, *cols.values())
        if n - full.shape[1] < (full.shape[1] if degree == 2 else MIN_RESIDUAL_DF):
            continue
        designs = {}
        for k in knobs:
            reduced = _basis(n, *(c for other, c in cols.items() if other != k))
            if full.shape[1] > reduced.shape[1]:
                designs[k] = _Design(reduced, full, full.shape[1] - reduced.shape[1], n - full.shape[1])
        return model, designs
    designs = {}
    for k in knobs:
        full, reduced = _basis(n, _columns(k, configs, 1)), _basis(n)
        if full.shape[1] > 1 and n - full.shape[1] >= MIN_RESIDUAL_DF:
            designs[k] = _Design(reduced, full, full.shape[1] - 1, n - full.shape[1])
    return "marginal", designs


def _freedman_lane(y: _FloatArray, d: _Design, perms: _IntArray) -> tuple[float, _FloatArray]:
    """The partial R² of the knob on ``y`` and the statistic ``-log p(F)`` for the observed data
    (index 0) and each permutation of the reduced model's residuals (``perms``' rows)."""
    residual = y - d.reduced @ (d.reduced.T @ y)
    rss = float(residual @ residual)
    total = float(((y - y.mean()) ** 2).sum())
    if rss <= 1e-12 * total:  # the other knobs already explain the metric entirely
        return 0.0, np.zeros(perms.shape[0])
    e = residual[perms]  # each row: the residuals in one permuted order
    in_reduced = ((e @ d.reduced) ** 2).sum(axis=1)
    in_full = ((e @ d.full) ** 2).sum(axis=1)
    explained = np.maximum(in_full - in_reduced, 0.0)
    left = np.maximum(rss - in_full, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(left > 1e-12 * rss, (explained / d.df1) / (left / d.df2),
                     np.where(explained > 1e-12 * rss, np.inf, 0.0))
    stat = np.nan_to_num(-stats.f.logsf(f, d.df1, d.df2), nan=0.0, posinf=np.inf)
    return float(explained[0] / rss), np.asarray(stat, dtype=float)
