"""Optuna samplers by name: ``tpe`` (default, multivariate), ``nsga2``, ``random``, ``gp``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import optuna

from autotune.errors import AutotuneError

ConstraintsFunc = Callable[[optuna.trial.FrozenTrial], Sequence[float]]


def make_sampler(name: str, seed: int | None, constraints_func: ConstraintsFunc,
                 n_startup_trials: int = 5) -> optuna.samplers.BaseSampler:
    """A constraint-aware sampler. ``gp`` needs torch (``pip install 'autotune[gp]'``)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=n_startup_trials,
            constraints_func=constraints_func,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup_trials),
                                             constraints_func=constraints_func)
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
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials,
                                         constraints_func=constraints_func)
    raise AutotuneError(f"unknown sampler {name!r}; use tpe, nsga2, random or gp")


def constraints_from_attrs(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    """Read the constraint values the study stored on the trial (infeasible if missing)."""
    values = trial.user_attrs.get("constraints")
    return [float(v) for v in values] if values else [1.0, 1.0]
