"""Two runs of the shipped CronJob spec (cluster/autotune/spec-configmap.yaml) on the fake cluster:
the second re-checks the first's recommendation against what is applied and the baseline.

Between the runs the operator applies the recommendation (the first run's ``recommended/``
manifests: the DestinationRule's pool and the sidecar annotations), so the cluster's state at the
second start is the recommendation; the second run measures Istio's default (applied by the
target) and that state, interleaved, and puts the applied state back at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner

from autotune.cli import main
from autotune.mesh import MeshConfig, SidecarResources, parse_cpu, sidecar_annotations, traffic_policy
from autotune.study import Verdict, recheck_of, run_outcome_of
from fake_k8s import KubeEnv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NS, DEP, DR = KubeEnv.NAMESPACE, KubeEnv.DEPLOYMENT, KubeEnv.DR


def _shipped_spec(env: KubeEnv, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The CronJob's spec pointed at the fake cluster, with a small budget and short windows."""
    (cm,) = yaml.safe_load_all((REPO / "cluster" / "autotune" / "spec-configmap.yaml").read_text())
    data = yaml.safe_load(cm["data"]["spec.yaml"])
    data["target"] = {**{k: v for k, v in data["target"].items() if k != "inCluster"}, **env.target_data()}
    data["study"].update(storage=f"sqlite:///{tmp_path}/s.db", trials=3, resultsDir=str(tmp_path / "out"))
    data["load"].update(users=4, ratePerUser=10)
    data["measurement"].update(repeats=1, maxRepeats=1, driftEvery=0, confirmMaxConfigs=1)
    data["timing"].update(warmup=0.5, window=2, xdsPush=0, rolloutTimeout=10)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def _state(env: KubeEnv) -> tuple[dict[str, str], Any]:
    return env.cluster.annotations(NS, DEP), (env.cluster.dr(NS, DR) or {}).get("spec")


def _proxy_cpu(pod: dict[str, Any]) -> float:
    """A sidecar that uses more CPU the higher its limit (more headroom, more workers busy)."""
    for c in pod["spec"]["containers"]:
        if c["name"] == "istio-proxy":
            return 0.02 + 0.05 * parse_cpu(c["resources"]["limits"]["cpu"])
    return 0.05


@pytest.fixture
def cpu_follows_the_limit(kube: KubeEnv) -> Iterator[None]:
    kube.cluster.proxy_cpu_of = _proxy_cpu
    yield
    kube.cluster.proxy_cpu_of = None


@pytest.mark.usefixtures("cpu_follows_the_limit")
def test_two_runs_of_the_cronjob_spec_recheck_what_is_applied(kube: KubeEnv, tmp_path: Path) -> None:
    kube.seed()
    path, data = _shipped_spec(kube, tmp_path)
    runner = CliRunner()
    first = runner.invoke(main, ["study", "run-scheduled", str(path)], catch_exceptions=False)
    assert first.exit_code == Verdict.CHANGED.exit_code, first.output  # the series' first recommendation
    storage = data["study"]["storage"]
    (name1,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert name1.startswith("backend-staging-")
    out1 = run_outcome_of(optuna.load_study(study_name=name1, storage=storage))
    assert out1 is not None and out1.recommendation is not None and out1.recommendation.params
    rec = out1.recommendation.config
    assert (tmp_path / "out" / name1 / "recommended" / "deployment-patch.yaml").is_file()

    # The operator applies the recommendation (its DestinationRule pool and sidecar annotations).
    sidecar = SidecarResources.model_validate(data["sidecar"])
    kube.seed(annotations=sidecar_annotations(rec, sidecar), traffic_policy=traffic_policy(rec))
    applied = _state(kube)
    before = len(kube.cluster.requests)
    second = runner.invoke(main, ["study", "run-scheduled", str(path)], catch_exceptions=False)
    assert second.exit_code in (Verdict.UNCHANGED.exit_code, Verdict.CHANGED.exit_code), second.output
    name2 = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))[-1]
    run2 = optuna.load_study(study_name=name2, storage=storage)
    checked = recheck_of(run2)
    assert checked is not None and checked.previous == name1 and checked.rounds == 2
    assert not checked.applied_is_baseline  # the cluster ran the recommendation, not Istio's defaults
    (entry,) = [c for c in checked.configs if "previous recommendation" in c.roles]
    assert entry.roles == ["previous recommendation", "applied"] and entry.config == rec
    assert entry.rounds == 2 and entry.changes and entry.before  # against the baseline, now and then
    assert entry.holds is not None and len(checked.baseline) == len(data["objectives"])
    # The baseline was applied (Istio's defaults: no pool, no CPU limit annotation) during the re-check …
    patches = [r for r in kube.cluster.requests[before:] if r.method == "PATCH" and r.path.endswith(f"/{DR}")]
    assert patches
    # … and the applied recommendation is back at the end.
    assert _state(kube) == applied
    out2 = run_outcome_of(run2)
    assert out2 is not None and out2.previous == name1
    report = (tmp_path / "out" / name2 / "report.md").read_text()
    assert "### Re-check" in report and "previous recommendation, applied" in report
    assert MeshConfig() != rec
