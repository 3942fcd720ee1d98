"""The study loop end to end on the local target: real Envoy, real Locust, real SQLite storage."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from _specs import small_spec
from autotune.errors import FailReason, TrialFailed
from autotune.export import export_study, results_dir
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import INTERRUPTED, NullObserver, counted_trials, pareto_trials, run_single, run_study
from autotune.targets.local import LocalTarget

pytestmark = pytest.mark.slow


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _study(spec: StudySpec) -> optuna.Study:
    return optuna.load_study(study_name=spec.study.name, storage=spec.study.storage)


def test_short_study_records_every_trial_and_writes_exports(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    study = run_study(spec)
    export_study(study, results_dir(spec))
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    base = trials[0]
    assert base.user_attrs["baseline"] is True and base.params == {}
    assert base.user_attrs["config"] == {} and base.user_attrs["envoy_concurrency"] == 2
    for t in trials:
        ua = t.user_attrs
        assert ua["requests"] > 0 and ua["latency_p95_ms"] >= ua["latency_p50_ms"] > 0
        assert 0 < ua["cpu_cores"] < 2.5
        assert ua["observed"]["concurrency"] == ua["envoy_concurrency"]
        assert "kind: DestinationRule" in ua["destinationrule.yaml"]
    out = tmp_path / "out" / "t"
    rows = _csv(out / "trials.csv")
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    pareto = _csv(out / "pareto.csv")
    front = pareto_trials(study)
    assert [int(r["trial"]) for r in pareto] == [t.number for t in front] and front
    for t in front:
        folder = out / f"trial-{t.number:03d}"
        dr = yaml.safe_load((folder / "destinationrule.yaml").read_text())
        patch = yaml.safe_load((folder / "deployment-patch.yaml").read_text())
        assert dr["apiVersion"] == "networking.istio.io/v1" and dr["spec"]["host"]
        ann = patch["spec"]["template"]["metadata"]["annotations"]
        assert len([k for k in ann if k.startswith("sidecar.istio.io/proxy")]) == 4


def test_circuit_breaker_overflows_are_infeasible(tmp_path: Path) -> None:
    """Tiny maxConnections/http1MaxPendingRequests under load: fast 503s must not look good."""
    from autotune.study import violations

    spec = small_spec(tmp_path, **{"load.users": 20, "load.ratePerUser": 20,
                                   "target.upstream.serviceTimeMs": 20})
    tight = run_single(spec, MeshConfig(max_connections=1, http1_max_pending_requests=1))
    broken = violations(spec.constraints, tight.metrics)
    assert tight.status_counts.get("503", 0) > 0
    assert tight.metrics["error_rate"] > spec.constraints.max_error_rate
    assert any("error rate" in v for v in broken)
    roomy = run_single(spec, MeshConfig())
    assert roomy.metrics["error_rate"] == 0 and not violations(spec.constraints, roomy.metrics)


class _InterruptOnTrial(NullObserver):
    """Simulates Ctrl-C in the middle of the n-th trial's measurement window."""

    def __init__(self, n: int) -> None:
        self.n, self.started = n, 0

    def trial_started(self, *args: Any) -> None:
        self.started += 1

    def phase(self, name: str, fraction: float) -> None:
        if self.started == self.n and name == "measure" and fraction > 0.2:
            raise KeyboardInterrupt


def test_interrupted_study_resumes_where_it_stopped(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, _InterruptOnTrial(2))
    study = _study(spec)
    states = [(t.state.name, t.user_attrs.get("fail_reason")) for t in study.get_trials()]
    assert states == [("COMPLETE", None), ("FAIL", INTERRUPTED)]
    assert counted_trials(study) == 1
    run_study(spec)  # the same start again continues
    study = _study(spec)
    assert counted_trials(study) == 3
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.get_trials()) == 1


class _NeverReadyOnce(LocalTarget):
    """A proxy that never becomes ready for the first tuned config (like a sidecar stuck in a
    crash loop); the baseline and later configs behave normally."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.applied = MeshConfig()
        self.failed = False
        self.restores = 0

    def apply(self, config: MeshConfig) -> None:
        self.applied = config
        super().apply(config)

    def wait_ready(self, timeout_s: float) -> None:
        if self.applied != MeshConfig() and not self.failed:
            self.failed = True
            raise TrialFailed(FailReason.NOT_READY, "proxy did not become ready within 0s (simulated)")
        super().wait_ready(timeout_s)

    def restore(self) -> None:
        self.restores += 1
        super().restore()


def test_failed_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    target = _NeverReadyOnce(spec.target, spec.service)
    study = run_study(spec, target=target)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    failed = trials[1]
    assert failed.user_attrs["fail_reason"] == "not-ready"
    assert "simulated" in failed.user_attrs["fail_message"]
    assert target.restores >= 1  # back to the baseline after the failure
    rows = _csv(tmp_path / "out" / "t" / "trials.csv")
    assert rows[1]["state"] == "FAIL" and "not-ready" in rows[1]["fail_reason"]


def test_broken_load_fails_every_trial_but_the_study_completes(tmp_path: Path) -> None:
    broken = tmp_path / "broken_locustfile.py"
    broken.write_text("raise RuntimeError('this locustfile is broken')\n")
    spec = small_spec(tmp_path, **{"study.trials": 2, "load.locustfile": str(broken)})
    study = run_study(spec)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["fail_reason"] == "load" for t in trials)
    assert "this locustfile is broken" in trials[0].user_attrs["fail_message"]
    assert pareto_trials(study) == []
