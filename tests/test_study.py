"""The study loop end to end on the local target: real Envoy, real Locust, real SQLite storage.

Only what a real proxy and load can show lives here; the loop's logic (budget, failures, Ctrl-C,
drift, confirmation, export rows) is tested on the replay driver in ``test_loop.py``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from _specs import small_spec
from autotune.export import export_study, results_dir
from autotune.mesh import MeshConfig
from autotune.study import TrialRecord, run_single, run_study

pytestmark = pytest.mark.slow


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_short_study_records_every_trial_and_writes_exports(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    study = run_study(spec)
    export_study(study, results_dir(spec))
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    records = [TrialRecord.read(t) for t in trials]
    assert records[0].baseline and records[0].config == MeshConfig() and trials[0].params == {}
    for rec in records:
        m = rec.metrics
        assert m["requests"] > 0 and m["latency_p95_ms"] >= m["latency_p50_ms"] > 0
        assert 0 < m["cpu_cores"] < 2.5
        # Envoy runs with the worker count the config implies (2 for Istio's 2000m default).
        assert rec.observed["concurrency"] == rec.config.effective_concurrency
        assert "kind: DestinationRule" in rec.manifests["destinationrule.yaml"]
    out = tmp_path / "out" / "t"
    rows = _csv(out / "trials.csv")
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert [float(r["latency_p95_ms"]) for r in rows] == [r.metrics["latency_p95_ms"] for r in records]
    pareto = _csv(out / "pareto.csv")
    feasible = {int(r["trial"]) for r in rows if r["feasible"] == "True"}
    assert pareto and {int(r["trial"]) for r in pareto} <= feasible
    for r in pareto:
        folder = out / f"trial-{int(r['trial']):03d}"
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
