"""The scheduled job on the real local target (Envoy, Locust, the finite-capacity service): three
runs back to back, the service slowed down between the second and the third.

Kept short: 2 knobs on a small grid (a connection cap of 4 or 5, a CPU limit of 400m or 1000m,
far above what the proxy uses at this load, so no config sits at the throttling knee), one 2 s
window per trial, 2 re-check and confirmation rounds. At 100 requests/s and a 10 ms service time
every config carries the load with little queueing (a cap of 4 connections carries 400/s; with a
cap of 2, requests queued behind a busy endpoint's connection and p95 varied by tens of % from
run to run), and p95 (~13 ms) is mostly the service; at 80 ms a cap of 5 connections carries at
most 62 requests/s, so the recommendation stops holding and only Istio's defaults (no cap)
remain feasible.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from _local import needs_cgroup, needs_envoy
from _specs import small_spec_data
from autotune.cli import main
from autotune.study import Verdict, counted_trials, recheck_of, run_outcome_of, stop_record, warm_start_of

pytestmark = [pytest.mark.slow, needs_envoy, needs_cgroup]
BUDGET = 8


def _spec(tmp_path: Path, service_ms: float) -> Path:
    data = small_spec_data(tmp_path, **{
        "study.name": "svc", "study.trials": BUDGET, "study.sampler": "random",
        "parameters": {"connectionPool.tcp.maxConnections": {"low": 4, "high": 5},
                       "proxy.cpuLimit": {"low": "400m", "high": "1000m", "step": "600m"}},
        "objectives": ["cpu_limit_cores", "latency_p95_ms"],
        "load": {"users": 10, "ratePerUser": 10},
        "timing.warmup": 1, "timing.window": 2,
        "measurement": {"repeats": 1, "maxRepeats": 1, "driftEvery": 0, "confirmRounds": 2,
                        "confirmMaxConfigs": 1, "stopAfterFlat": 2},
        "target": {"kind": "local", "upstream": {"endpoints": 2, "serviceTimeMs": service_ms}},
        "sidecar": {"cpuRequest": "100m"},
    })
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _latest(tmp_path: Path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path}/s.db"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    return optuna.load_study(study_name=names[-1], storage=storage)


def test_three_scheduled_runs_on_the_local_target(tmp_path: Path) -> None:
    runner = CliRunner()
    days = []
    for day, service_ms in enumerate((10.0, 10.0, 80.0)):
        result = runner.invoke(main, ["study", "run-scheduled", str(_spec(tmp_path, service_ms))],
                               catch_exceptions=False)
        study = _latest(tmp_path)
        outcome = run_outcome_of(study)
        assert outcome is not None, result.output
        assert result.exit_code == outcome.verdict.exit_code, result.output
        report = (tmp_path / "out" / study.study_name / "report.md").read_text()
        assert f"(exit code {outcome.verdict.exit_code})" in report
        assert json.loads((tmp_path / "out" / study.study_name / "outcome.json").read_text())["verdict"] == \
            outcome.verdict.value
        # Each run stops before its budget once its front is flat.
        assert stop_record(study).stopped_after == counted_trials(study) < BUDGET, (day, result.output)
        days.append((study, outcome, result.output))

    (run1, out1, _), (run2, out2, log2), (run3, out3, log3) = days
    assert out1.verdict == Verdict.CHANGED and out1.recommendation is not None
    assert out1.recommendation.params  # a tuned config, not Istio's defaults
    # Run 2: the recommendation holds, and the search was seeded with run 1's configs.
    assert out2.verdict == Verdict.UNCHANGED, log2
    assert out2.recommendation is not None and out2.recommendation.params == out1.recommendation.params
    warm = warm_start_of(run2)
    assert warm is not None and warm.previous == run1.study_name and warm.carried
    checked = recheck_of(run2)
    assert checked is not None and checked.recommendation() is not None
    # Run 3: the slower service; the cap no longer carries the load.
    assert out3.verdict == Verdict.CHANGED, log3
    checked3 = recheck_of(run3)
    assert checked3 is not None
    prev = checked3.recommendation()
    assert prev is not None and prev.holds is False and prev.infeasible_rounds >= 1, log3
    moved = {(m.what, m.metric) for m in out3.moved}
    assert ("baseline", "latency_p95_ms") in moved, log3
    assert out3.recommendation is not None and out3.recommendation.params == {}, log3  # Istio's defaults
    assert "recommendation changed: Istio's defaults" in log3 and "moved: baseline p95 ms" in log3
