"""Scenarios on the replay driver and target: every scenario runs in order on the same config with
its load and faults, per-scenario metrics reach the record and the CSVs, objectives and
constraints name a scenario's metric, an infeasible config stops after its first window (early
abort), and a spec without scenarios behaves as before."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest

from _specs import small_spec
from autotune.errors import SpecError, UnsupportedParameter
from autotune.export import export_study, results_dir
from autotune.mesh import MeshConfig
from autotune.spec import EndpointFault, LoadSpec, StudySpec, load_spec
from autotune.study import TrialRecord, measure_config, open_study, run_study
from autotune.study._record import enqueue_baseline
from autotune.targets import Target
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget

STEADY_RPS, SURGE_RPS = 100.0, 300.0  # small_spec: 5 users x 20/s; the surge: 10 users x 30/s


pytestmark = pytest.mark.usefixtures("fast_storage")


SCENARIOS = [
    {"name": "steady"},
    {"name": "surge", "load": {"users": 10, "ratePerUser": 30}, "warmup": "500ms", "windows": 1, "slo": "20ms"},
    {"name": "failing", "faults": [{"endpoints": 1, "errorRate": 0.5}], "windows": 1},
]


def _point(config: MeshConfig) -> Point:
    """Steady: latency falls with the CPU limit; fewer than 4 connections overflow (20 % 503s)."""
    p95 = 4.0 + 1.0 / config.effective_cpu_limit
    errors = 0.2 if (config.max_connections or 10**6) < 4 else 0.0
    return Point(p95 * 0.5, p95, p95 * 1.2, cpu_cores=0.05 * config.effective_cpu_limit, error_rate=errors)


def _conditions(config: MeshConfig, point: Point, load: LoadSpec, faults: tuple[EndpointFault, ...]) -> Point:
    """A surge above capacity: with up to 64 connections the proxy sheds a third of it and stays
    fast; with more, it queues (5x the latency). A failing endpoint: 25 % errors."""
    if load.offered_rps > STEADY_RPS:
        tight = (config.max_connections or 10**6) <= 64
        factor = 1.0 if tight else 5.0
        point = replace(point, latency_p50_ms=point.latency_p50_ms * factor,
                        latency_p95_ms=point.latency_p95_ms * factor,
                        latency_p99_ms=point.latency_p99_ms * factor,
                        error_rate=max(point.error_rate, 0.33 if tight else 0.0), cpu_cores=point.cpu_cores * 3)
    if faults:
        point = replace(point, error_rate=max(point.error_rate, 0.25))
    return point


def _land() -> Landscape:
    return Landscape.synthetic(_point, conditions=_conditions)


def _spec(tmp_path: Path, **overrides: Any) -> StudySpec:
    base: dict[str, Any] = {
        "scenarios": SCENARIOS,
        "constraints": {"maxErrorRate": 0.01, "surge": {"maxErrorRate": 0.5, "minThroughputRatio": 0.0},
                        "failing": {"maxErrorRate": 0.3}},
        "objectives": ["steady.latency_p95_ms", "surge.goodput_slo_rps", "cpu_used_cores"],
        "measurement.repeats": 2, "measurement.maxRepeats": 2,
        "parameters": {"connectionPool.tcp.maxConnections": {"low": 1, "high": 1024, "log": True},
                       "proxy.cpuLimit": {"low": "100m", "high": "1", "log": True}},
    }
    return small_spec(tmp_path, **{**base, **overrides})


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_every_scenario_runs_in_order_with_its_load_and_faults(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    land = _land()
    target = ReplayTarget(land)
    config = MeshConfig(max_connections=32, cpu_limit=0.5)
    with target:
        m = measure_config(target, spec, config, load=ReplayDriver(land))
    fail = EndpointFault(endpoints=1, error_rate=0.5)
    # Same config throughout; steady (2 windows), surge (1, its own load), failing (1, its faults).
    assert [(c, ld.offered_rps, f, n) for c, ld, f, n in land.runs_log] == [
        (config, STEADY_RPS, (), 2), (config, SURGE_RPS, (), 1), (config, STEADY_RPS, (fail,), 1)]
    assert target.applied == [config]
    assert target.fault_calls == [(fail,), ()]  # put in force before the scenario, cleared after
    assert m.aborted is None and m.metrics["windows"] == 4
    truth = _conditions(config, _point(config), spec.scenario_list()[1].load, ())
    assert m.metrics["surge.latency_p95_ms"] == pytest.approx(truth.latency_p95_ms)
    assert m.metrics["surge.error_rate"] == pytest.approx(0.33, abs=0.01)
    assert m.metrics["surge.goodput_rps"] == pytest.approx(SURGE_RPS * (1 - m.metrics["surge.error_rate"]))
    assert 0 < m.metrics["surge.goodput_slo_rps"] <= m.metrics["surge.goodput_rps"]
    assert m.metrics["surge.cpu_cores"] == pytest.approx(3 * m.metrics["steady.cpu_cores"])
    assert m.metrics["failing.error_rate"] == pytest.approx(0.25)
    # The first scenario's metrics also carry their historical, unprefixed names.
    assert m.metrics["latency_p95_ms"] == m.metrics["steady.latency_p95_ms"]
    assert "goodput_slo_rps" not in m.metrics  # steady has no SLO


def test_a_study_records_and_exports_per_scenario_metrics_and_constraints(tmp_path: Path) -> None:
    spec = _spec(tmp_path, **{"study.trials": 6})
    land = _land()
    study = run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))
    trials = study.get_trials()
    assert len(trials) == 6
    for t in trials:
        rec = TrialRecord.read(t)
        # One constraint per (scenario, rule); the first scenario's keep their old names.
        assert set(t.constraints) == {"error_rate", "throughput_ratio", "surge.error_rate",
                                      "surge.throughput_ratio", "failing.error_rate",
                                      "failing.throughput_ratio"}
        if rec.aborted_after is None:
            # Objectives read the named scenario's metric; surge.goodput_slo_rps is maximized.
            assert t.values == [rec.metrics["steady.latency_p95_ms"], rec.metrics["surge.goodput_slo_rps"],
                                rec.metrics["cpu_used_cores"]]
            # The surge sheds load within its own (looser) rules: feasible when steady is.
            assert t.constraints["surge.error_rate"] == pytest.approx(rec.metrics["surge.error_rate"] - 0.5)
            assert rec.feasible == (rec.metrics["steady.error_rate"] <= 0.01)
    assert study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
    export_study(study, results_dir(spec))
    rows = _csv(results_dir(spec) / "trials.csv")
    for row, t in zip(rows, trials, strict=True):
        rec = TrialRecord.read(t)
        for name in ("steady.latency_p95_ms", "surge.goodput_slo_rps", "failing.error_rate"):
            expected = rec.metrics.get(name)
            assert (float(row[name]) == pytest.approx(expected)) if expected is not None else row[name] == ""
    pareto = _csv(results_dir(spec) / "pareto.csv")
    assert pareto and all("surge.goodput_slo_rps_vs_baseline_pct" in r for r in pareto)


def test_an_infeasible_config_stops_after_its_first_window(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """maxConnections 2 overflows in steady's first window: the second window, the surge and the
    failing endpoint are skipped; the trial is COMPLETE, infeasible, with its constraint values."""
    spec = _spec(tmp_path, **{"study.trials": 2})
    land = _land()
    broken = MeshConfig(max_connections=2, cpu_limit=0.5)
    study = open_study(spec)  # the baseline first, then the broken config
    enqueue_baseline(study)
    study.enqueue_trial(broken.to_params())
    with caplog.at_level(logging.INFO, logger="autotune.study"):
        study = run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))
    base, trial = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and TrialRecord.read(trial).config == broken
    rec = TrialRecord.read(trial)
    assert not rec.feasible and trial.constraints["error_rate"] == pytest.approx(0.2 - 0.01)
    # Skipped scenarios neither keep nor break their rules.
    assert trial.constraints["surge.error_rate"] == 0.0 and trial.constraints["failing.error_rate"] == 0.0
    planned = (1 + 2 * 2) + (0.5 + 2) + (1 + 2)  # warm-up + windows of each scenario, s
    assert rec.aborted_after == {"scenario": "steady", "window": 1, "skipped_windows": 1,
                                 "skipped_scenarios": ["surge", "failing"],
                                 "saved_s": pytest.approx(planned - (1 + 2))}
    assert rec.timings["saved_s"] == pytest.approx(planned - 3)
    assert [n for c, _, _, n in land.runs_log if c == broken] == [1]  # one window, one scenario
    assert [n for c, _, _, n in land.runs_log if c == MeshConfig()] == [2, 1, 1]  # the baseline: all
    assert "surge.latency_p95_ms" not in rec.metrics and rec.metrics["steady.error_rate"] == pytest.approx(0.2)
    assert trial.values is not None and len(trial.values) == 3
    assert trial.values[1] == TrialRecord.read(base).metrics["surge.goodput_slo_rps"]  # worst seen: finite
    assert any("skipping 1 window(s)" in r.getMessage() for r in caplog.records)
    assert any(v.startswith("steady: error rate") for v in rec.violations)
    export_study(study, results_dir(spec))
    row = _csv(results_dir(spec) / "trials.csv")[1]
    assert row["aborted_after"] == "steady window 1" and float(row["abort_saved_s"]) == pytest.approx(planned - 3)


def test_early_abort_can_be_turned_off(tmp_path: Path) -> None:
    spec = _spec(tmp_path, **{"measurement.earlyAbort": False})
    land = _land()
    with ReplayTarget(land) as target:
        m = measure_config(target, spec, MeshConfig(max_connections=2), load=ReplayDriver(land))
    assert m.aborted is None and [n for *_, n in land.runs_log] == [2, 1, 1]


def test_a_config_throttled_beyond_the_bound_in_its_first_window_stops_there(tmp_path: Path) -> None:
    """``maxThrottledRatio`` is a constraint like the others: the first window's share of
    throttled CPU periods (what the target read for that window) can end the trial early."""
    spec = _spec(tmp_path, **{"constraints": {"maxErrorRate": 0.01, "maxThrottledRatio": 0.05,
                                              "surge": {"maxErrorRate": 0.5, "minThroughputRatio": 0.0},
                                              "failing": {"maxErrorRate": 0.3}}})

    def throttled(config: MeshConfig) -> Point:
        return replace(_point(config), throttled_ratio=0.4 if config.effective_cpu_limit < 0.2 else 0.01)

    land = Landscape.synthetic(throttled, conditions=_conditions)
    with ReplayTarget(land) as target:
        tight = measure_config(target, spec, MeshConfig(max_connections=8, cpu_limit=0.1), load=ReplayDriver(land))
        roomy = measure_config(target, spec, MeshConfig(max_connections=8, cpu_limit=0.5), load=ReplayDriver(land))
    assert tight.aborted is not None and tight.aborted.scenario == "steady"
    assert tight.metrics["steady.cpu_throttled_ratio"] == pytest.approx(0.4)
    assert roomy.aborted is None
    assert [n for c, *_, n in land.runs_log if c.cpu_limit == 0.1] == [1]  # one window, one scenario
    assert [n for c, *_, n in land.runs_log if c.cpu_limit == 0.5] == [2, 1, 1]


def test_a_confirmation_smaller_than_the_front_covers_each_objective(tmp_path: Path) -> None:
    """confirmMaxConfigs smaller than the front: the best config of each objective (steady p95,
    surge goodput, a maximized one, CPU) is confirmed, not the runners-up of the first objective."""
    from autotune.study._confirm import candidates
    from autotune.study._front import pareto_trials

    spec = _spec(tmp_path, **{"study.trials": 16, "study.sampler": "random", "measurement.confirmRounds": 0})
    land = _land()
    study = run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))
    front = [t for t in pareto_trials(study) if not TrialRecord.read(t).baseline]
    bests = {min(front, key=lambda t: (t.values[0], t.number)).number,
             max(front, key=lambda t: (t.values[1], -t.number)).number,
             min(front, key=lambda t: (t.values[2], t.number)).number}
    assert len(front) > len(bests) >= 2, [t.values for t in front]
    small = spec.with_overrides(**{"measurement.confirm_max_configs": len(bests)})
    chosen = [t.number for t in candidates(study, small)]
    assert set(chosen) == bests
    assert chosen == [t.number for t in front if t.number in bests]  # in front order
    # One slot: the best first objective.
    assert [t.number for t in candidates(study, spec.with_overrides(**{"measurement.confirm_max_configs": 1}))] \
        == [front[0].number]


def test_a_spec_without_scenarios_runs_one_steady_scenario_as_before(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 3})
    (steady,) = spec.scenario_list()
    assert steady.name == "steady" and steady.load == spec.load and steady.warmup == spec.timing.warmup
    land = Landscape.synthetic(_point)
    study = run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))
    for t in study.get_trials():
        assert set(t.constraints) == {"error_rate", "throughput_ratio"}
        rec = TrialRecord.read(t)
        assert t.values == [rec.metrics["latency_p95_ms"], rec.metrics["cpu_used_cores"]]
    export_study(study, results_dir(spec))
    header = _csv(results_dir(spec) / "trials.csv")[0]
    assert "latency_p95_ms" in header and not any(k.startswith("steady.") for k in header)


def test_a_target_without_fault_support_refuses_a_spec_with_faults(tmp_path: Path) -> None:
    class NoFaults(ReplayTarget):
        supports_service_faults = False

    land = _land()
    target = NoFaults(land)
    with pytest.raises(UnsupportedParameter, match="scenarios failing have service faults"):
        run_study(_spec(tmp_path), target=target, load=ReplayDriver(land))
    assert not target.started  # refused before anything ran


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"objectives": ["burst.latency_p95_ms"]},
     "objectives[0].metric: no scenario 'burst' (scenarios: steady, surge, failing)"),
    ({"objectives": ["surge.latency_p42_ms"]}, "objectives[0].metric: unknown metric 'latency_p42_ms'"),
    ({"objectives": ["steady.goodput_slo_rps"]}, "objectives[0].metric: goodput_slo_rps needs a latency SLO"),
    ({"constraints": {"burst": {"maxErrorRate": 0.5}}}, "constraints.burst: no scenario 'burst'"),
    ({"scenarios": [*SCENARIOS, {"name": "surge"}]}, "scenarios[3].name: 'surge' is already scenarios[1]"),
    ({"scenarios": [{"name": "x", "faults": [{"endpoints": 1, "errorRate": 1}, {"endpoints": 2, "delayMs": 5}]}]},
     "scenarios[0].faults: faults name 3 endpoints but there are only 2 (target.upstream.endpoints)"),
    ({"scenarios": [{"name": "x", "faults": [{"errorRate": 0.6, "resetRate": 0.6}]}]},
     "scenarios[0].faults[0]: errorRate + resetRate must be at most 1"),
    ({"scenarios": [{"name": "Surge.1"}]}, "scenarios[0].name"),
])
def test_scenario_specs_are_checked_when_read(tmp_path: Path, overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as err:
        _spec(tmp_path, **overrides)
    assert expected in str(err.value)


def test_scenario_defaults_and_directions(tmp_path: Path) -> None:
    spec = _spec(tmp_path, **{"slo": "50ms", "objectives": [{"steady.latency_p99_corrected_ms": "minimize"},
                                                             "surge.goodput_rps", "steady.goodput_slo_rps"]})
    steady, surge, failing = spec.scenario_list()
    assert (steady.slo_ms, surge.slo_ms) == (50.0, 20.0)  # the top-level SLO unless the scenario has one
    assert surge.load.users == 10 and surge.load.per_user_rate == 30 and surge.load.path == spec.load.path
    assert (surge.warmup, surge.window, surge.windows) == (0.5, spec.timing.window, 1)
    assert failing.constraints.max_error_rate == 0.3
    assert failing.constraints.min_throughput_ratio == spec.constraints.min_throughput_ratio
    assert [o.direction for o in spec.objectives] == ["minimize", "maximize", "maximize"]


def test_the_shipped_scenario_spec_reads_and_faults_are_refused_by_default() -> None:
    spec = load_spec(Path(__file__).parents[1] / "search-spaces" / "local-scenarios.yaml")
    steady, surge, failing = spec.scenario_list()
    assert (steady.name, surge.name, failing.name) == ("steady", "surge", "failing")
    assert surge.load.offered_rps == 3 * steady.load.offered_rps and surge.constraints.max_error_rate == 0.6
    assert failing.faults == (EndpointFault(endpoints=1, error_rate=0.5),)

    class Plain(ReplayTarget):  # the Target's default hook, as the Kubernetes target has it
        supports_service_faults = False

        def set_service_faults(self, faults: Sequence[EndpointFault]) -> None:
            Target.set_service_faults(self, faults)

    target = Plain(_land())
    target.set_service_faults(())  # clearing is always allowed
    with pytest.raises(UnsupportedParameter, match="cannot apply service faults"):
        target.set_service_faults(failing.faults)


def test_scenario_settings_survive_a_copy_with_overrides(tmp_path: Path) -> None:
    """``with_overrides`` (the CLI's --trials …) re-reads the spec: partial loads and partial
    per-scenario rules still fall back to the top-level ones."""
    spec = _spec(tmp_path, **{"constraints.minThroughputRatio": 0.9})
    again = spec.with_overrides(**{"study.trials": 7})
    assert again.scenario_list() == spec.scenario_list()
    assert again.scenario_list()[2].constraints.min_throughput_ratio == 0.9  # failing: only maxErrorRate


# --- on the real local target (Envoy, upstream processes, Locust) ---------------------------------


@pytest.mark.slow
def test_a_failing_endpoint_scenario_on_the_local_target_aborts_after_one_window(tmp_path: Path) -> None:
    """steady (one window), then one of the two endpoints answering 503 to half its requests:
    its first window breaks the scenario's 5 % error limit, so its two other windows are skipped
    — the target measures one window with the fault in force and the load stops there (Envoy
    saw no more requests than one window's) — and the endpoints are healed afterwards."""
    from autotune.mesh import cluster_name
    from autotune.targets import ProxyUsage, make_target
    from autotune.targets.local import LocalTarget
    from autotune.targets.local._counters import read_counters

    fault = EndpointFault(endpoints=1, error_rate=0.5)
    spec = small_spec(tmp_path, **{
        "scenarios": [{"name": "steady", "windows": 1},
                      {"name": "failing", "faults": [fault.model_dump(by_alias=True)], "windows": 3}],
        "constraints": {"failing": {"maxErrorRate": 0.05}}})
    target = make_target(spec)
    assert isinstance(target, LocalTarget)
    measured: list[tuple[tuple[EndpointFault, ...], float]] = []  # faults in force, Envoy's requests
    end_window = target.end_window

    def recording_end_window() -> ProxyUsage:
        usage = end_window()
        measured.append((target.endpoint_faults, usage.extra["envoy_upstream_rq"]))
        return usage

    target.end_window = recording_end_window  # type: ignore[method-assign]
    with target:
        m = measure_config(target, spec, MeshConfig())
        assert target.envoy is not None
        sent = read_counters(target.envoy, cluster_name(spec.service))["upstream_rq_total"]
        assert target.endpoint_faults == ()  # healed after the scenario
    print({k: round(v, 3) for k, v in m.metrics.items() if k.endswith(("error_rate", "p95_ms"))},
          m.aborted, measured, sent)
    assert m.metrics["steady.error_rate"] == 0.0
    assert m.metrics["failing.error_rate"] > 0.05
    assert m.aborted is not None and (m.aborted.scenario, m.aborted.skipped_windows) == ("failing", 2)
    assert m.metrics["windows"] == 2 and m.aborted.saved_s == pytest.approx(2 * spec.timing.window)
    # The target measured exactly one window of each scenario, the second with the fault in force.
    assert [faults for faults, _ in measured] == [(), (fault,)]
    rate, warmup, window = spec.load.offered_rps, spec.timing.warmup, spec.timing.window
    assert all(n == pytest.approx(rate * window, rel=0.2) for _, n in measured), measured
    assert m.metrics["failing.requests"] == pytest.approx(rate * window, rel=0.2)
    # Locust stopped after that window: Envoy saw two warm-ups and two windows of requests
    # (600 here), not the three windows the failing scenario planned (1000).
    assert sent < rate * (2 * warmup + 2 * window) + 0.5 * rate * window, sent


def test_the_report_and_the_cli_show_each_scenario_against_the_default(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from autotune.cli import main
    from autotune.export import front_with_baseline, scenario_text_tables, study_scenarios

    spec = _spec(tmp_path, **{"study.trials": 6})
    land = _land()
    study = run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))
    frame = front_with_baseline(study)
    tables = scenario_text_tables(frame, study_scenarios(study))
    assert [t.title.split(":")[0] for t in tables] == ["Scenario steady", "Scenario surge", "Scenario failing"]
    surge = tables[1]
    print(surge.plain())
    base_row = next(r for r in surge.rows if r[0].endswith("(baseline)"))
    goodput = surge.headers.index("goodput in SLO rps")
    for row in surge.rows:
        trial = int(row[0].split()[0])
        value = TrialRecord.read(study.trials[trial]).metrics["surge.goodput_slo_rps"]
        assert row[goodput] == f"{value:.2f}"
        if row is not base_row and float(base_row[goodput]) > 0:
            change = 100 * (value / float(base_row[goodput]) - 1)
            assert row[goodput + 1] == f"{change:+.1f}%"
    export_study(study, results_dir(spec))
    report = (results_dir(spec) / "report.md").read_text()
    assert "### Scenario surge: the Pareto configs against Istio's default" in report
    out = CliRunner().invoke(main, ["pareto", spec.study.name, "--storage", spec.study.storage])
    assert out.exit_code == 0, out.output
    assert "Scenario failing: the Pareto configs against Istio's default" in out.output
