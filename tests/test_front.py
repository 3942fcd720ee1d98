"""The Pareto front on hand-made trials: known dominance, infeasible and drift-check trials left out."""

from __future__ import annotations

import optuna
import pytest

from autotune.mesh import MeshConfig
from autotune.study import TrialRecord, baseline_trial, pareto_trials

FEASIBLE = {"error_rate": -0.01, "throughput_ratio": -0.05}
INFEASIBLE = {"error_rate": 0.2, "throughput_ratio": -0.05}


def _study(directions: list[str], trials: list[tuple[list[float], dict[str, float] | None,
                                                     TrialRecord]]) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    for values, constraints, record in trials:
        study.add_trial(optuna.trial.create_trial(values=values, constraints=constraints,
                                                  user_attrs=record.user_attrs()))
    return study


def _numbers(study: optuna.Study) -> list[int]:
    return [t.number for t in pareto_trials(study)]


PLAIN = TrialRecord(config=MeshConfig(concurrency=1))
BASE = TrialRecord(baseline=True)
DRIFT = TrialRecord(baseline=True, drift_check=True)


def test_front_keeps_exactly_the_non_dominated_feasible_trials() -> None:
    study = _study(["minimize", "minimize"], [
        ([5.0, 2.0], FEASIBLE, BASE),      # 0: dominated by 3
        ([9.0, 0.1], FEASIBLE, PLAIN),     # 1: the cheapest
        ([6.0, 0.5], FEASIBLE, PLAIN),     # 2: dominated by 3 (equal CPU, slower)
        ([4.0, 0.5], FEASIBLE, PLAIN),     # 3: on the front
        ([1.0, 0.1], INFEASIBLE, PLAIN),   # 4: would dominate all, but breaks a constraint
        ([3.0, 1.0], None, PLAIN),         # 5: no constraints stored: not known feasible
        ([4.0, 0.5], FEASIBLE, PLAIN),     # 6: ties 3: equal values do not dominate
        ([2.0, 3.0], FEASIBLE, DRIFT),     # 7: a baseline re-measurement: never on the front
    ])
    assert _numbers(study) == [3, 6, 1]  # by the first objective, then trial number


def test_front_follows_each_objective_direction() -> None:
    study = _study(["minimize", "maximize"], [
        ([5.0, 100.0], FEASIBLE, PLAIN),   # 0: dominated by 1 (slower, less throughput)
        ([4.0, 150.0], FEASIBLE, PLAIN),   # 1
        ([8.0, 300.0], FEASIBLE, PLAIN),   # 2
        ([9.0, 250.0], FEASIBLE, PLAIN),   # 3: dominated by 2
    ])
    assert _numbers(study) == [1, 2]


def test_failed_and_empty_studies_have_no_front() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    assert pareto_trials(study) == []
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs=PLAIN.user_attrs()))
    assert pareto_trials(study) == [] and baseline_trial(study) is None


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, 4), ({"first": True}, 0), ({"near": 1}, 0), ({"near": 2}, 0), ({"near": 3}, 4),
    ({"near": 9}, 4),
])
def test_baseline_trial_picks_the_first_latest_or_nearest(kwargs: dict[str, object], expected: int) -> None:
    study = _study(["minimize"], [([5.0], FEASIBLE, BASE), ([4.0], FEASIBLE, PLAIN),
                                  ([4.0], FEASIBLE, PLAIN), ([4.0], FEASIBLE, PLAIN),
                                  ([5.5], FEASIBLE, DRIFT)])
    found = baseline_trial(study, **kwargs)  # type: ignore[arg-type]
    assert found is not None and found.number == expected


def test_record_round_trips_and_reads_feasibility_from_constraints() -> None:
    rec = TrialRecord(config=MeshConfig(max_connections=8, cpu_limit=0.5), manifests={"x": "y"},
                      metrics={"latency_p95_ms": 4.0, "cpu_cores": float("nan")},
                      violations=["error rate 2.0% > 1.0%"], timings={"total_s": 1.5})
    study = _study(["minimize"], [([4.0], INFEASIBLE, rec), ([4.0], FEASIBLE, rec)])
    bad, good = (TrialRecord.read(t) for t in study.get_trials())
    assert bad.config == rec.config and bad.metrics["latency_p95_ms"] == 4.0
    assert bad.metrics["cpu_cores"] != bad.metrics["cpu_cores"]  # NaN stored as None, read as NaN
    assert bad.violations == rec.violations and bad.timings == rec.timings
    assert not bad.feasible and good.feasible
    assert "feasible" not in study.get_trials()[0].user_attrs  # one copy: Optuna's constraints
