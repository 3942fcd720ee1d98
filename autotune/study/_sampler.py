"""Optuna samplers by name: ``tpe`` (default, multivariate), ``nsga2``, ``random``, ``gp``."""

from __future__ import annotations

import optuna

from autotune.errors import AutotuneError


def make_sampler(name: str, seed: int | None, n_startup_trials: int = 5) -> optuna.samplers.BaseSampler:
    """A sampler by name. Constraints reach the constraint-aware ones (TPE, NSGA-II, GP) through
    ``Trial.set_constraint`` (Optuna 5), so no ``constraints_func`` is passed.
    ``gp`` needs torch (``pip install 'autotune[gp]'``).

    TPE is multivariate with ``group=True``: the Istio-default baseline trials carry no parameters,
    which empties Optuna's intersection search space, and a plain multivariate TPE then samples
    every knob independently; the group-decomposed space ignores them. NSGA-II and GP have no such
    option and still see an empty space (they sample independently: like random search)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=n_startup_trials
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup_trials))
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
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    raise AutotuneError(f"unknown sampler {name!r}; use tpe, nsga2, random or gp")
