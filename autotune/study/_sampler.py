"""Optuna samplers by name: ``tpe`` (default), ``nsga2``, ``random``, ``gp``."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from autotune.errors import AutotuneError


class _SampledTrials:
    """A view of a study that shows a sampler only the trials that sampled parameters: the
    Istio-default baseline trials (trial 0, drift checks, re-checks) carry none. Everything else —
    storage, directions, system attributes — is the study's own."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
                if t.params or t.state == TrialState.RUNNING]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class SearchedTrialsSampler(BaseSampler):
    """``base``, blind to the parameterless baseline trials. Optuna's relative samplers model the
    intersection of the completed trials' search spaces; a trial with no parameters empties it, and
    NSGA-II and GP then sample every knob independently (as random search would), and NSGA-II's
    crossover would read parameters a baseline parent lacks. This wrapper hands them a view of the
    study without those trials; ``after_trial`` (which records constraints and values) sees the
    real study."""

    def __init__(self, base: BaseSampler) -> None:
        self.base = base

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(_SampledTrials(study), trial)  # type: ignore[arg-type]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.base.sample_relative(_SampledTrials(study), trial, search_space)  # type: ignore[arg-type]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(_SampledTrials(study), trial,  # type: ignore[arg-type]
                                            param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(_SampledTrials(study), trial)  # type: ignore[arg-type]

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.base.after_trial(study, trial, state, values)


def make_sampler(name: str, seed: int | None, n_startup_trials: int = 5) -> optuna.samplers.BaseSampler:
    """A sampler by name. Constraints reach the constraint-aware ones (TPE, NSGA-II, GP) through
    ``Trial.set_constraint`` (Optuna 5), so no ``constraints_func`` is passed.
    ``gp`` needs torch (``pip install 'autotune[gp]'``).

    ``tpe`` is Optuna's default TPE: each knob modelled on its own (univariate), from every trial
    that sampled it. Measured side by side (``bench/search_efficiency.py``, 30 seeds, 40 trials): on
    the scenario landscape it kept 0.92 [0.79, 0.94] of the best hypervolume, where multivariate
    TPE (``group=True``, which the parameterless baselines require) kept 0.56 [0.39, 0.74] and random
    search 0.82; on the CPU-limit grid all three were alike.

    The Istio-default baseline trials carry no parameters, which empties Optuna's intersection
    search space: NSGA-II and GP, which model it, are wrapped in ``SearchedTrialsSampler``, so they
    model the searched trials instead of sampling every knob independently."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "nsga2":
        return SearchedTrialsSampler(optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup_trials)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise AutotuneError(
                "sampler 'gp' needs PyTorch: pip install 'torch==2.13.0' then pip install -e '.[gp]' "
                "(install the CPU build explicitly; a bare 'torch' pulls several GB)"
            ) from None
        return SearchedTrialsSampler(optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials))
    raise AutotuneError(f"unknown sampler {name!r}; use tpe, nsga2, random or gp")
