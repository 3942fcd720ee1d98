"""``constraints.maxThrottledRatio``: a config whose proxy ran out of CPU quota in more than that
share of the CFS periods of a window is infeasible, in the search and in every confirmation round
(each round a new proxy start), per scenario like the other rules; an unthrottled config is left
alone, and a spec without the rule has no such constraint. Replay driver and target (no Envoy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from _specs import small_spec
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import TrialRecord, confirm_front, constraint_values, measure_config, open_study, run_study
from autotune.targets import ProxyUsage
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget

pytestmark = pytest.mark.usefixtures("fast_storage")

KNEE = 0.3  # cores: below it the replayed proxy is throttled


def _knee(config: MeshConfig) -> Point:
    """Near the knee (limit < 0.3 cores) the proxy is throttled in 40 % of the periods and its
    p95 looks only a little worse; above it, never throttled."""
    limit = config.effective_cpu_limit
    throttled = 0.4 if limit < KNEE else 0.0
    p95 = 8.0 if limit < KNEE else 7.0
    return Point(5.0, p95, p95 * 1.2, cpu_cores=0.09, throttled_ratio=throttled)


def _spec(tmp_path: Path, **overrides: Any) -> StudySpec:
    base: dict[str, Any] = {"study.trials": 8, "objectives": ["latency_p95_ms", "cpu_limit_cores"],
                            "parameters": {"proxy.cpuLimit": {"low": "100m", "high": "2", "log": True}}}
    return small_spec(tmp_path, **{**base, **overrides})


def _measure(spec: StudySpec, config: MeshConfig, land: Landscape) -> dict[str, float]:
    target = ReplayTarget(land)
    with target:
        return measure_config(target, spec, config, load=ReplayDriver(land)).metrics


def test_the_rule_bounds_the_throttled_share_per_scenario(tmp_path: Path) -> None:
    scenarios = [{"name": "steady"}, {"name": "surge", "load": {"users": 10, "ratePerUser": 30}}]
    # Both scenarios measured (an early abort would stop at steady's first window: 40 % > 5 %).
    spec = _spec(tmp_path, scenarios=scenarios, **{"measurement.earlyAbort": False},
                 constraints={"maxThrottledRatio": 0.05, "surge": {"maxThrottledRatio": 0.5}})
    rules = [s.constraints.max_throttled_ratio for s in spec.scenario_list()]
    assert rules == [0.05, 0.5]
    m = _measure(spec, MeshConfig(cpu_limit=0.2), Landscape.synthetic(_knee))
    assert m["cpu_throttled_ratio"] == pytest.approx(0.4) == m["surge.cpu_throttled_ratio"]
    values = dict(constraint_values(spec.scenario_list(), m))
    assert set(values) == {"error_rate", "throughput_ratio", "cpu_throttled_ratio",
                           "surge.error_rate", "surge.throughput_ratio", "surge.cpu_throttled_ratio"}
    assert values["cpu_throttled_ratio"] == pytest.approx(0.35)  # > 0: broken on steady
    assert values["surge.cpu_throttled_ratio"] == pytest.approx(-0.1)  # the surge allows 50 %


def test_without_the_rule_there_is_no_throttling_constraint(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert spec.constraints.max_throttled_ratio is None
    m = _measure(spec, MeshConfig(cpu_limit=0.2), Landscape.synthetic(_knee))
    assert [name for name, _ in constraint_values(spec.scenario_list(), m)] == ["error_rate", "throughput_ratio"]


def test_the_worst_window_counts(tmp_path: Path) -> None:
    """Throttled in one window of three: the measurement's share is that window's, not the median."""
    spec = _spec(tmp_path, **{"measurement.repeats": 3, "measurement.maxRepeats": 3,
                              "constraints.maxThrottledRatio": 0.1})
    land = Landscape.synthetic(lambda _c: Point(5.0, 7.0, 8.0, cpu_cores=0.09))
    target = ReplayTarget(land)
    throttled = iter([0, 6, 0])  # of 20 periods
    original = target.end_window

    def end_window() -> ProxyUsage:
        usage = original()
        return ProxyUsage(cpu_cores=usage.cpu_cores, window_s=usage.window_s, periods=20,
                          throttled_periods=next(throttled))

    target.end_window = end_window  # type: ignore[method-assign]
    with target:
        m = measure_config(target, spec, MeshConfig(cpu_limit=0.2), load=ReplayDriver(land)).metrics
    assert m["windows"] == 3 and m["cpu_throttled_ratio"] == pytest.approx(0.3)
    assert dict(constraint_values(spec.scenario_list(), m))["cpu_throttled_ratio"] > 0


def test_a_study_keeps_configs_at_the_knee_off_its_feasible_front(tmp_path: Path) -> None:
    spec = _spec(tmp_path, **{"constraints.maxThrottledRatio": 0.1})
    study = run_study(spec, None, ReplayTarget(land := Landscape.synthetic(_knee, seed=3)),
                      load=ReplayDriver(land))
    records = [TrialRecord.read(t) for t in study.get_trials()]
    knee = [r for r in records if r.config.effective_cpu_limit < KNEE]
    roomy = [r for r in records if r.config.effective_cpu_limit >= KNEE]
    assert knee and roomy  # the sampler tried both sides
    assert all(r.violations == ["CPU throttled in 40% of periods > 10%"] for r in knee)
    assert all(not r.violations for r in roomy)
    front = study.best_trials
    assert front and all(TrialRecord.read(t).config.effective_cpu_limit >= KNEE for t in front)
    # Without the rule, the cheapest throttled config is on the front (lowest CPU limit).
    again = Landscape.synthetic(_knee, seed=3)
    plain = run_study(_spec(tmp_path, **{"study.name": "plain"}), None, ReplayTarget(again), load=ReplayDriver(again))
    assert any(TrialRecord.read(t).config.effective_cpu_limit < KNEE for t in plain.best_trials)


def _hand_made(study: optuna.Study, config: MeshConfig, p95: float, *, baseline: bool = False) -> None:
    rec = TrialRecord(config=config, baseline=baseline,
                      metrics={"latency_p95_ms": p95, "cpu_limit_cores": config.effective_cpu_limit})
    study.add_trial(optuna.trial.create_trial(
        values=[p95, config.effective_cpu_limit], user_attrs=rec.user_attrs(),
        constraints={"error_rate": -0.01, "throughput_ratio": -0.05, "cpu_throttled_ratio": -0.05}))


def test_confirmation_refuses_a_config_that_throttles_on_one_proxy_start(tmp_path: Path) -> None:
    """The knee's restart lottery: a config measured unthrottled in the search, throttled on its
    second start, is not confirmed; one that never throttles is."""
    spec = _spec(tmp_path, **{"constraints.maxThrottledRatio": 0.1, "measurement.confirmRounds": 3})
    knee, roomy = MeshConfig(cpu_limit=0.2), MeshConfig(cpu_limit=0.5)

    def point(config: MeshConfig, visit: int) -> Point:
        throttled = 0.3 if config == knee and visit == 1 else 0.0
        return Point(5.0, 7.0, 8.0, cpu_cores=0.09, throttled_ratio=throttled)

    study = open_study(spec)
    _hand_made(study, MeshConfig(), 7.0, baseline=True)
    _hand_made(study, knee, 7.0)
    _hand_made(study, roomy, 6.5)  # both on the recorded front
    land = Landscape(point)
    target = ReplayTarget(land)
    with target:
        result = confirm_front(study, spec, target, load=ReplayDriver(land))
    assert result is not None
    by_config = {TrialRecord.read(study.trials[n]).config: r for n, r in result.results.items()}
    assert by_config[knee].confirmed is False and by_config[knee].infeasible_rounds == 1
    assert by_config[knee].reason == "infeasible or failed in 1 of 3 rounds"
    assert by_config[roomy].confirmed is True  # CPU limit -75 %, never throttled
