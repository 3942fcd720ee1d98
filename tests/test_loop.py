"""The study loop on the replay driver and target: baseline first, budget, failures, Ctrl-C and
resume, drift re-measurement, confirmation and export, in milliseconds (no Envoy, no Locust)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import optuna
import pytest

from _specs import small_spec
from autotune.errors import FailReason
from autotune.export import export_study, pareto_frame, results_dir
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import (
    NullObserver,
    TrialOutcome,
    TrialRecord,
    confirm_front,
    confirmation_of,
    counted_trials,
    open_study,
    run_study,
)
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget

pytestmark = pytest.mark.usefixtures("fast_storage")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.read(t) for t in study.get_trials()]


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def _cpu_bound(config: MeshConfig) -> Point:
    """Latency falls and CPU use rises with the CPU limit; fewer than 4 connections overflow
    (20 % 503s)."""
    p95 = 4.0 + 1.0 / config.effective_cpu_limit
    errors = 0.2 if (config.max_connections or 10**6) < 4 else 0.0
    return Point(p95 * 0.5, p95, p95 * 1.2, cpu_cores=0.05 * config.effective_cpu_limit,
                 error_rate=errors)


def _replay(land: Landscape) -> tuple[ReplayTarget, ReplayDriver]:
    return ReplayTarget(land), ReplayDriver(land)


def _run(spec: StudySpec, land: Landscape, observer: Any = None) -> tuple[optuna.Study, ReplayTarget]:
    target, driver = _replay(land)
    return run_study(spec, observer, target, load=driver), target


def test_baseline_first_then_each_trial_measured_and_recorded(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 4, "measurement.repeats": 2,
                                   "measurement.maxRepeats": 2})
    land = Landscape.synthetic(_cpu_bound)
    study, target = _run(spec, land)
    records = _records(study)
    assert _states(study) == ["COMPLETE"] * 4 and counted_trials(study) == 4
    assert [r.baseline for r in records] == [True, False, False, False]
    assert records[0].config == MeshConfig() and study.get_trials()[0].params == {}
    assert target.applied == [r.config for r in records]  # trial 0 is Istio's defaults
    # A config that overflows stops after its first window (early abort); the others run both.
    windows = [1 if r.aborted_after else 2 for r in records]
    assert target.windows == sum(windows) and not target.window_open and target.closed
    for r, n in zip(records, windows, strict=True):
        truth = _cpu_bound(r.config)
        assert r.metrics["latency_p95_ms"] == pytest.approx(truth.latency_p95_ms)
        assert r.metrics["cpu_cores"] == pytest.approx(truth.cpu_cores)
        assert r.metrics["requests"] == n * 100 * 2  # n windows of 2 s at 100 rps
        assert len(r.windows) == n and r.feasible == (truth.error_rate == 0)
        assert (r.aborted_after is not None) == (truth.error_rate > 0)
        assert r.observed["concurrency"] == r.config.effective_concurrency
        assert "kind: DestinationRule" in r.manifests["destinationrule.yaml"]


def _failing_in_order(reasons: list[FailReason | None]) -> Landscape:
    """The n-th distinct config applied (the baseline is the 0th) fails with ``reasons[n]``."""
    order: list[MeshConfig] = []

    def point(config: MeshConfig, _visit: int) -> Point:
        if config not in order:
            order.append(config)
        n = order.index(config)
        fail = reasons[n] if n < len(reasons) else None
        return Point(3.0, 5.0, 6.0, cpu_cores=0.1, fail=fail)

    return Landscape(point)


def test_failed_trials_use_up_the_budget_and_the_target_is_restored(tmp_path: Path) -> None:
    reasons = [None, FailReason.NOT_READY, FailReason.LOAD, FailReason.REJECTED,
               FailReason.NO_SUCCESS, FailReason.METRICS]
    spec = small_spec(tmp_path, **{"study.trials": 8})
    study, target = _run(spec, _failing_in_order(reasons))
    assert _states(study) == ["COMPLETE"] + ["FAIL"] * 5 + ["COMPLETE"] * 2
    assert counted_trials(study) == 8
    assert [r.fail_reason for r in _records(study)[:6]] == reasons
    assert target.restores == 5 + 1  # after each failure, and by close()
    assert target.closed and target.landscape.applied == MeshConfig()
    export_study(study, results_dir(spec))
    rows = _csv(results_dir(spec) / "trials.csv")
    assert [r["state"] for r in rows] == _states(study)
    assert rows[1]["fail_reason"].startswith("not-ready: replayed")


class _InterruptAfter(NullObserver):
    """Ctrl-C right after trial ``n`` finished (the trial itself completed)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def trial_finished(self, outcome: TrialOutcome, front: list[TrialOutcome]) -> None:
        if outcome.number == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["load", "observer"])
def test_ctrl_c_restores_and_closes_and_the_study_resumes_to_the_budget(tmp_path: Path, where: str) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 5})
    land = Landscape.synthetic(_cpu_bound, interrupt_on_run=3 if where == "load" else None)
    target, driver = _replay(land)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, _InterruptAfter(2) if where == "observer" else None, target, load=driver)
    assert target.closed and not target.window_open and not driver.active
    assert land.applied == MeshConfig()  # the baseline is back
    study = open_study(spec)
    if where == "load":  # trial 2 was cut short: recorded, but not counted
        assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL"]
        assert _records(study)[2].fail_reason == FailReason.INTERRUPTED
        assert counted_trials(study) == 2
    else:  # trial 2 had completed: it counts
        assert _states(study) == ["COMPLETE"] * 3 and counted_trials(study) == 3
    land.interrupt_on_run = None
    study, again = _run(spec, land)
    assert counted_trials(study) == 5
    assert len(study.get_trials()) == 5 + (where == "load")
    assert sum(r.baseline for r in _records(study)) == 1 and again.closed
    assert again.applied[0] != MeshConfig()  # resuming does not measure the baseline again


class _ShiftAfter(NullObserver):
    """The machine slows down by ``factor`` after trial ``n`` (a noisy neighbour arrives)."""

    def __init__(self, land: Landscape, n: int, factor: float) -> None:
        self.land, self.n, self.factor = land, n, factor

    def trial_finished(self, outcome: TrialOutcome, front: list[TrialOutcome]) -> None:
        if outcome.number == self.n:
            self.land.shift(self.factor)


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_drift_checks_every_n_trials_outside_the_budget(tmp_path: Path, factor: float,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 5, "measurement.driftEvery": 2})
    land = Landscape.synthetic(_cpu_bound)
    with caplog.at_level(logging.WARNING, logger="autotune.study"):
        study, _ = _run(spec, land, _ShiftAfter(land, 2, factor))
    records = _records(study)
    # 0 baseline, 1, 2, then 2 trials since the baseline: 3 re-measures it; 4, 5 end the budget.
    assert [r.drift_check for r in records] == [False, False, False, True, False, False]
    assert [r.baseline for r in records] == [True, False, False, True, False, False]
    assert counted_trials(study) == 5 and len(records) == 6
    assert records[3].drift_pct == pytest.approx(100 * (factor - 1))
    drifted = any("baseline drift" in r.getMessage() for r in caplog.records)
    assert drifted == (factor > 1)


def _concurrency(row: dict[str, str]) -> int | None:
    """The row's proxy.concurrency (pandas writes the column as floats; empty when left out)."""
    return int(float(row["proxy.concurrency"])) if row["proxy.concurrency"] else None


def test_export_rows_match_the_landscape(tmp_path: Path) -> None:
    """Concurrency 1..3 with a landscape whose front is known: the baseline (5 ms, 0.25 cores),
    concurrency 2 (6 ms, 0.2) and 1 (9 ms, 0.1); 3 is infeasible although fastest."""
    truth = {None: (5.0, 0.25, 0.0), 1: (9.0, 0.1, 0.0), 2: (6.0, 0.2, 0.0), 3: (1.0, 0.3, 0.5)}

    def point(config: MeshConfig) -> Point:
        p95, cpu, errors = truth[config.concurrency]
        return Point(p95 / 2, p95, p95, cpu_cores=cpu, error_rate=errors)

    spec = small_spec(tmp_path, **{"study.trials": 9, "measurement.driftEvery": 3,
                                   "parameters": {"proxy.concurrency": {"low": 1, "high": 3}},
                                   "objectives": ["latency_p95_ms", "cpu_cores"]})
    study, _ = _run(spec, Landscape.synthetic(point))
    export_study(study, results_dir(spec))
    out = results_dir(spec)
    rows = _csv(out / "trials.csv")
    conc = {int(r["trial"]): _concurrency(r) for r in rows}
    assert {1, 2, 3} <= set(conc.values())  # the seed tried every value
    checks = [int(r["trial"]) for r in rows if r["baseline"] == "True" and r["trial"] != "0"]
    assert checks and all(rows[n]["drift_pct"] == "0.0" for n in checks)
    for r in rows:
        p95, cpu, errors = truth[_concurrency(r)]
        assert float(r["latency_p95_ms"]) == p95 and float(r["cpu_cores"]) == cpu
        assert r["feasible"] == str(errors == 0) and ("error rate" in r["violations"]) == (errors > 0)
    # The front by hand: trial 0, then every concurrency-2 trial, then every concurrency-1 trial;
    # not the drift checks (same values as trial 0), not concurrency 3 (infeasible).
    expected = [0] + [n for n, c in conc.items() if c == 2] + [n for n, c in conc.items() if c == 1]
    pareto = _csv(out / "pareto.csv")
    assert [int(r["trial"]) for r in pareto] == expected
    baselines = [0, *checks]
    for r in pareto:
        n = int(r["trial"])
        nearest = min(baselines, key=lambda b: (abs(b - n), b))
        assert int(r["compared_with_baseline"]) == nearest
        p95, cpu, _ = truth[_concurrency(r)]
        assert float(r["latency_p95_ms_vs_baseline_pct"]) == pytest.approx(round(100 * (p95 - 5) / 5, 1))
        assert float(r["cpu_cores_vs_baseline_pct"]) == pytest.approx(round(100 * (cpu - 0.25) / 0.25, 1))
        assert (out / f"trial-{n:03d}" / "deployment-patch.yaml").is_file()
    assert len(list(out.glob("trial-*"))) == len(expected)


def _hand_made(study: optuna.Study, config: MeshConfig, p95: float, baseline: bool = False) -> None:
    """A trial as the search recorded it (one lucky or unlucky window), without running it."""
    rec = TrialRecord(config=config, baseline=baseline,
                      metrics={"latency_p95_ms": p95, "cpu_reserved_cores": config.effective_cpu_limit})
    study.add_trial(optuna.trial.create_trial(
        values=[p95, config.effective_cpu_limit], user_attrs=rec.user_attrs(),
        constraints={"error_rate": -0.01, "throughput_ratio": -0.05}))


def test_confirmation_decides_per_config_in_interleaved_rounds(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"objectives": ["latency_p95_ms", "cpu_reserved_cores"],
                                   "measurement.confirmRounds": 3, "measurement.confidence": 0.9})
    lucky = MeshConfig(max_retries=1000)  # looked fast once; measures like the baseline
    cheaper = MeshConfig(cpu_limit=0.5)  # a quarter of the CPU limit, same latency: a real gain
    flaky = MeshConfig(cpu_limit=1.0, max_connections=2)  # overflows in its second round
    broken = MeshConfig(cpu_limit=0.75)  # its load fails in the third round

    def point(config: MeshConfig, visit: int) -> Point:
        errors = 0.5 if config == flaky and visit == 1 else 0.0
        fail = FailReason.LOAD if config == broken and visit == 2 else None
        return Point(2.5, 5.0, 6.0, cpu_cores=0.1, error_rate=errors, fail=fail)

    study = open_study(spec)
    _hand_made(study, MeshConfig(), 5.0, baseline=True)
    _hand_made(study, lucky, 2.0)
    _hand_made(study, cheaper, 5.1)
    _hand_made(study, flaky, 3.0)
    _hand_made(study, broken, 4.0)
    land = Landscape(point)
    target, driver = _replay(land)
    with target:
        result = confirm_front(study, spec, target, load=driver)
    assert result is not None and result.trials == [1, 3, 4, 2]  # by p95 as recorded
    base, fast, cheap, flk, brk = MeshConfig(), lucky, cheaper, flaky, broken
    assert target.applied == [base, fast, flk, brk, cheap,  # round 1
                              base, cheap, brk, flk, fast,  # round 2, reversed
                              base, fast, flk, brk, cheap]  # round 3
    by_trial = result.results
    assert by_trial[1].confirmed is False
    assert by_trial[1].reason == "no objective improved beyond its confidence interval"
    assert by_trial[2].confirmed is True
    assert by_trial[2].changes["cpu_reserved_cores"].mean_pct == pytest.approx(-75.0)
    assert by_trial[3].confirmed is False and by_trial[3].infeasible_rounds == 1
    assert by_trial[3].reason == "infeasible or failed in 1 of 3 rounds"
    assert by_trial[4].confirmed is False and by_trial[4].rounds == 2
    assert by_trial[4].reason == "infeasible or failed in 1 of 3 rounds"
    assert result.baseline["latency_p95_ms"] == [5.0, 5.0, 5.0]
    frame = pareto_frame(study).set_index("trial")
    assert list(frame["confirmed"]) == [False, False, False, True]
    assert frame.loc[2, "cpu_reserved_cores_confirmed_change_pct"] == pytest.approx(-75.0)
    # The same front again is not measured again.
    again = ReplayTarget(land)
    with again:
        assert confirm_front(study, spec, again, load=ReplayDriver(land)) == result
    assert again.applied == []


def test_a_study_ends_with_the_confirmation_of_its_front(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 4, "measurement.confirmRounds": 2})
    study, target = _run(spec, Landscape.synthetic(_cpu_bound))
    result = confirmation_of(study)
    assert result is not None and result.rounds == 2
    front = result.trials
    assert front and set(result.results) == set(front)
    assert len(target.applied) == 4 + 2 * (len(front) + 1)
    assert target.applied[4] == MeshConfig()  # each round starts with the baseline
