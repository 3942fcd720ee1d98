"""Samplers by name, and that constraints set on trials steer the constraint-aware ones."""

from __future__ import annotations

import importlib.util

import optuna
import pytest

from autotune.errors import AutotuneError
from autotune.study import make_sampler
from autotune.study._sampler import SearchedTrialsSampler


@pytest.mark.parametrize("name,cls", [("tpe", optuna.samplers.TPESampler),
                                      ("nsga2", optuna.samplers.NSGAIISampler),
                                      ("random", optuna.samplers.RandomSampler)])
def test_samplers_by_name(name: str, cls: type) -> None:
    sampler = make_sampler(name, seed=1)
    assert isinstance(sampler.base if isinstance(sampler, SearchedTrialsSampler) else sampler, cls)


def test_gp_needs_the_optional_torch_extra() -> None:
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(AutotuneError, match=r"pip install 'torch==2.13.0'"):
            make_sampler("gp", seed=1)
    else:  # pragma: no cover - only where the [gp] extra is installed
        sampler = make_sampler("gp", seed=1)
        assert isinstance(sampler, SearchedTrialsSampler) and isinstance(sampler.base, optuna.samplers.GPSampler)


def test_tpe_avoids_the_infeasible_region() -> None:
    """x < 30 breaks a constraint (like a circuit breaker that rejects traffic) yet scores best;
    after start-up, TPE must mostly propose feasible x."""
    study = optuna.create_study(sampler=make_sampler("tpe", seed=3), directions=["minimize", "minimize"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_int("x", 1, 100)
        trial.set_constraint("error_rate", 30 - x)
        return float(x), float(100 - x) / 10

    study.optimize(objective, n_trials=40)
    late = [t.params["x"] for t in study.trials[15:]]
    assert sum(x >= 30 for x in late) >= 0.8 * len(late)


def test_tpe_learns_after_a_parameterless_baseline_trial() -> None:
    """Every study starts with Istio's defaults, a trial without parameters (infeasible here, as a
    default that overflows under a surge). After its startup trials, the TPE the spec asks for
    must still learn from the searched trials: mostly feasible x, and its proposals drawn from
    its model (not its startup random draws)."""
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=make_sampler("tpe", seed=4, n_startup_trials=5))
    study.enqueue_trial({})  # the baseline: no parameters

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if trial.number == 0:
            trial.set_constraint("error_rate", 0.5)
            return 1.0, 100.0
        x = trial.suggest_int("x", 1, 100)
        y = trial.suggest_float("y", 0.1, 2.0, log=True)
        trial.set_constraint("error_rate", 70 - x)  # x < 70 overflows, yet scores best
        return float(x) + y, float(100 - x) / 10 + 1 / y
    study.optimize(objective, n_trials=41)
    late = [t.params["x"] for t in study.trials[16:]]
    assert sum(x >= 70 for x in late) >= 0.6 * len(late)  # random search: 31 % feasible


def test_nsga2_breeds_from_the_searched_trials_despite_the_baseline() -> None:
    """With Istio's defaults as trial 0 (no parameters), NSGA-II must still see the knobs and breed
    its later generations from earlier trials (crossover copies a parent's value, mutation draws a
    new one with probability 1/knobs), not draw every knob independently as random search does."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler("nsga2", seed=2,
                                                                                          n_startup_trials=4))
    study.enqueue_trial({})  # the baseline: no parameters

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if trial.number == 0:
            return 10.0, 10.0
        x = trial.suggest_float("x", 0.1, 2.0, log=True)
        y = trial.suggest_float("y", 1.0, 64.0)
        z = trial.suggest_float("z", 0.0, 1.0)
        trial.set_constraint("error_rate", z - 0.8)
        return 1 / x + y / 64 + z, x
    study.optimize(objective, n_trials=21)
    last = study.trials[-1]
    assert set(study.sampler.infer_relative_search_space(study, last)) == {"x", "y", "z"}
    # Trials 1-4: generation 0 (random); from trial 9 on, children of earlier generations.
    inherited = total = 0
    for t in study.trials[9:]:
        earlier = {(k, v) for e in study.trials[1:t.number] for k, v in e.params.items()}
        inherited += sum((k, v) in earlier for k, v in t.params.items())
        total += len(t.params)
    assert inherited >= 0.5 * total, (inherited, total)  # independent float draws: never equal
