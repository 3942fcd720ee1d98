"""A recorded scenario landscape replayed through the real study loop: each scenario's load run is
answered by that scenario's recorded figures, and a config snaps to the nearest recorded one over
numeric, categorical and unset-CPU-limit knobs (tests/data/landscape-scenarios-tiny.csv)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from _specs import small_spec
from autotune.mesh import MeshConfig
from autotune.spec import EndpointFault, StudySpec
from autotune.study import TrialRecord, run_study
from autotune.testing.replay import ReplayDriver, ReplayTarget
from autotune.testing.scenario_grid import ScenarioGrid

pytestmark = pytest.mark.usefixtures("fast_storage")

TINY = Path(__file__).parent / "data" / "landscape-scenarios-tiny.csv"
#: The fixture's rows: (steady p95, surge p95, surge share within the SLO, failing error rate).
ROWS = [(10.0, 100.0, 0.30, 0.25), (11.0, 60.0, 0.60, 0.10), (30.0, 400.0, 0.05, 0.30), (15.0, 40.0, 0.80, 0.02)]


def _spec(tmp_path: Path, trials: int = 8) -> StudySpec:
    return small_spec(tmp_path, **{
        "study.trials": trials,
        "parameters": {
            "connectionPool.tcp.maxConnections": {"low": 1, "high": 256, "log": True},
            "loadBalancer.simple": {"choices": ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"]},
            "proxy.cpuLimit": {"low": "100m", "high": "1", "log": True, "unset": True},
        },
        "slo": "50ms",
        "scenarios": [{"name": "steady"}, {"name": "surge", "load": {"users": 15}, "windows": 1},
                      {"name": "failing", "faults": [{"endpoints": 1, "errorRate": 0.5}], "windows": 1}],
        "objectives": ["steady.latency_p95_ms", "surge.goodput_slo_rps", "failing.error_rate", "cpu_limit_cores"],
        "constraints": {"surge": {"maxErrorRate": 0.6, "minThroughputRatio": 0.3},
                        "failing": {"maxErrorRate": 0.5}},
        "measurement.earlyAbort": False,
    })


def test_nearest_recorded_config_over_numeric_categorical_and_unset_cpu_limit(tmp_path: Path) -> None:
    grid = ScenarioGrid.read(TINY, _spec(tmp_path))
    # Istio's defaults are the row with every setting left out.
    assert grid.nearest(MeshConfig()) == 0
    # No CPU limit snaps to the recorded config without one, not to the 2000m default.
    assert grid.nearest(MeshConfig(no_cpu_limit=True, lb_simple="RANDOM", max_connections=6)) == 1
    # With the other settings alike, the unset limit decides: no limit -> row 1, 1000m -> row 3.
    assert grid.nearest(MeshConfig(no_cpu_limit=True, lb_simple="RANDOM")) == 1
    assert grid.nearest(MeshConfig(cpu_limit=1.0, lb_simple="RANDOM")) == 3
    # The load-balancing policy decides between two configs the numbers alone would not.
    assert grid.nearest(MeshConfig(cpu_limit=0.3, max_connections=16, lb_simple="RANDOM")) == 3
    assert grid.nearest(MeshConfig(cpu_limit=0.3, max_connections=16, lb_simple="ROUND_ROBIN")) == 2
    # Numbers snap in log space: 25 connections are nearer to 4 than to 256 in log, not in value.
    assert grid.nearest(MeshConfig(no_cpu_limit=True, lb_simple="RANDOM", max_connections=25)) == 1


def _trials(spec: StudySpec, seed: int, noise: bool) -> tuple[list[TrialRecord], ReplayTarget, ScenarioGrid]:
    grid = ScenarioGrid.read(TINY, spec)
    land = grid.landscape(seed=seed, noise=noise)
    target = ReplayTarget(land)
    study = run_study(spec, target=target, load=ReplayDriver(land))
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    return [TrialRecord.read(t) for t in done], target, grid


def test_each_scenario_replays_its_own_recorded_figures_through_run_study(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    records, target, grid = _trials(spec, seed=1, noise=False)
    assert len(records) == 8 and records[0].baseline
    # The failing scenario's fault was put in force and cleared around its load run each trial.
    assert target.fault_calls.count((EndpointFault(endpoints=1, error_rate=0.5),)) == len(records)
    rows_seen = set()
    for rec in records:
        i = grid.nearest(rec.config)
        rows_seen.add(i)
        steady, surge, share, failing = ROWS[i]
        m = rec.metrics
        assert m["steady.latency_p95_ms"] == pytest.approx(steady)
        assert m["surge.latency_p95_ms"] == pytest.approx(surge)
        assert m["failing.latency_p95_ms"] == pytest.approx(1.5 * steady)
        assert m["failing.error_rate"] == pytest.approx(failing, abs=0.005)
        assert m["surge.offered_rps"] == pytest.approx(15 * 20)  # the surge's own load
        # goodput within the SLO comes back as recorded: 80 % of the surge served, `share` in time
        assert m["surge.goodput_slo_rps"] == pytest.approx(0.8 * 300 * share, rel=0.02)
        assert m["cpu_limit_cores"] == pytest.approx(rec.config.effective_cpu_limit)
    assert len(rows_seen) >= 2  # the sampler's proposals reached more than one recorded config


def test_replayed_noise_follows_the_recorded_spread_and_the_seed(tmp_path: Path) -> None:
    spec = _spec(tmp_path, trials=1)  # the baseline only: row 0 every time
    (a,), _, _ = _trials(spec, seed=1, noise=True)
    (b,), _, _ = _trials(spec.with_overrides(**{"study.name": "b"}), seed=1, noise=True)
    (c,), _, _ = _trials(spec.with_overrides(**{"study.name": "c"}), seed=2, noise=True)
    p95 = [r.metrics["steady.latency_p95_ms"] for r in (a, b, c)]
    assert p95[0] == p95[1] != p95[2]  # seeded: same seed, same noise
    # The recorded cv is 0.1: a window's p95 stays within a few sigma of the recorded 10 ms.
    assert all(math.isfinite(v) and 10.0 * math.exp(-0.5) < v < 10.0 * math.exp(0.5) for v in p95)
    assert a.metrics["failing.error_rate"] != pytest.approx(0.25, abs=1e-9) or \
        c.metrics["failing.error_rate"] != pytest.approx(0.25, abs=1e-9)
