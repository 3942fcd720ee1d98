"""Confirmation decisions on synthetic paired runs: confirmed, unconfirmed, infeasible, too few rounds."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from _specs import small_spec
from autotune.spec import StudySpec
from autotune.study import ObjectiveChange, confirmation_of
from autotune.study._confirm import _evaluate
from autotune.study._record import set_confirmation

OBJECTIVES = ["latency_p95_ms", "cpu_reserved_cores"]


@pytest.fixture()
def spec(tmp_path: Path) -> StudySpec:
    return small_spec(tmp_path, **{"objectives": OBJECTIVES, "measurement.confidence": 0.9})


def _run(p95: float, cpu: float, errors: float = 0.0) -> dict[str, float]:
    return {"latency_p95_ms": p95, "cpu_reserved_cores": cpu, "error_rate": errors,
            "throughput_ratio": 1.0}


BASE = [_run(10.0, 2.0), _run(12.0, 2.0), _run(11.0, 2.0)]  # the machine drifts between rounds


def test_a_gain_beyond_the_interval_is_confirmed_and_the_trade_off_reported(spec: StudySpec) -> None:
    faster = [_run(8.0, 2.0), _run(9.6, 2.0), _run(8.8, 2.0)]  # 20 % faster in every round
    cheaper = [_run(10.2, 0.5), _run(12.3, 0.5), _run(11.1, 0.5)]  # a quarter of the CPU, ~2 % slower
    out = _evaluate(spec, [1, 2], {"baseline": BASE, "1": faster, "2": cheaper}, OBJECTIVES)
    one, two = out.results[1], out.results[2]
    assert one.confirmed is True and one.reason is None
    assert one.changes["latency_p95_ms"] == ObjectiveChange(mean_pct=-20.0, low_pct=-20.0, high_pct=-20.0)
    assert two.confirmed is True
    assert two.changes["cpu_reserved_cores"].mean_pct == -75.0
    assert two.changes["latency_p95_ms"].low_pct > 0  # slower, and it says so
    assert out.baseline["latency_p95_ms"] == [10.0, 12.0, 11.0]


def test_noise_within_the_interval_is_not_confirmed(spec: StudySpec) -> None:
    same = [_run(10.5, 2.0), _run(11.4, 2.0), _run(11.3, 2.0)]  # +5 %, -5 %, +3 %
    entry = _evaluate(spec, [1], {"baseline": BASE, "1": same}, OBJECTIVES).results[1]
    change = entry.changes["latency_p95_ms"]
    assert change.low_pct < 0 < change.high_pct
    assert entry.confirmed is False
    assert entry.reason == "no objective improved beyond its confidence interval"


def test_one_infeasible_or_failed_round_is_enough_to_refuse(spec: StudySpec) -> None:
    overflow = [_run(8.0, 0.5), _run(9.6, 0.5, errors=0.3), _run(8.8, 0.5)]
    failed = [_run(8.0, 0.5), None, _run(8.8, 0.5)]
    out = _evaluate(spec, [1, 2], {"baseline": BASE, "1": overflow, "2": failed}, OBJECTIVES)
    one, two = out.results[1], out.results[2]
    assert one.confirmed is False and one.infeasible_rounds == 1 and one.rounds == 3
    assert one.reason == "infeasible or failed in 1 of 3 rounds"
    assert two.confirmed is False and two.infeasible_rounds == 1 and two.rounds == 2
    assert two.changes["cpu_reserved_cores"].mean_pct == -75.0  # still reported, paired


def test_fewer_than_two_paired_rounds_decide_nothing(spec: StudySpec) -> None:
    better = [_run(5.0, 0.5), _run(6.0, 0.5)]
    base = [_run(10.0, 2.0), None]  # the baseline's second round failed
    entry = _evaluate(spec, [1], {"baseline": base, "1": better}, OBJECTIVES).results[1]
    assert entry.rounds == 1 and entry.changes == {}
    assert entry.confirmed is False and entry.reason == "fewer than 2 paired rounds"
    assert entry.infeasible_rounds == 0


# The JSON an earlier version stored in the study's ``confirmation`` attribute; studies keep it.
STORED = {
    "trials": [3, 7], "rounds": 2, "confidence": 0.9,
    "baseline": {"latency_p95_ms": [10.0, None]},
    "results": {
        "3": {"rounds": 2, "infeasible_rounds": 0, "confirmed": True,
              "changes": {"latency_p95_ms": {"mean_pct": -20.0, "low_pct": -25.5, "high_pct": -14.0}}},
        "7": {"rounds": 1, "infeasible_rounds": 1, "confirmed": False, "changes": {},
              "reason": "infeasible or failed in 1 of 2 rounds"},
    },
}


def test_a_stored_confirmation_reads_as_records_and_is_written_back_unchanged() -> None:
    study = optuna.create_study(directions=["minimize"])
    study.set_user_attr("confirmation", STORED)
    result = confirmation_of(study)
    assert result is not None and result.trials == [3, 7] and result.confidence == 0.9
    assert result.baseline == {"latency_p95_ms": [10.0, None]}
    assert result.results[3].changes["latency_p95_ms"] == ObjectiveChange(-20.0, -25.5, -14.0)
    assert result.results[3].confirmed and result.results[3].reason is None
    assert result.results[7].trial == 7 and result.results[7].reason == STORED["results"]["7"]["reason"]
    other = optuna.create_study(directions=["minimize"])
    set_confirmation(other, result)
    assert other.user_attrs["confirmation"] == STORED
    assert confirmation_of(other) == result


def test_a_stored_confirmation_this_version_cannot_read_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    study = optuna.create_study(directions=["minimize"])
    study.set_user_attr("confirmation", {"trials": [1], "results": {"1": {"confirmed": "maybe"}}})
    assert confirmation_of(study) is None
    assert "ignoring the stored confirmation" in caplog.text
