"""The Kubernetes target's scenario faults (misbehaving replicas), route settings (VirtualService
retries) and the DestinationRule and pod knobs it now applies, against the fake API server.

The fake enforces what a real cluster does: Deployments validated against the Kubernetes 1.35
schema, a Service's selector deciding which pods are its endpoints (so a misbehaving copy serves
its share of the traffic), VirtualServices and DestinationRules validated against Istio's CRDs and
their CEL rules, and, with ``use_role``, the shipped Role's RBAC.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from _crd import strict_dr_schema, strict_vs_schema
from _specs import small_spec
from autotune import mesh
from autotune.errors import TargetError
from autotune.load import LocustDriver
from autotune.mesh import MeshConfig
from autotune.spec import EndpointFault, LoadSpec
from autotune.study import run_study
from autotune.targets import make_target
from autotune.targets.kubernetes import KubernetesTarget
from autotune.targets.kubernetes._faults import ENV_ERROR_RATE, FAULT_LABEL
from autotune.targets.kubernetes._snapshot import STATE_KEY
from autotune.testing.conformance import burst
from fake_k8s import DictStore, FakeCluster, KubeEnv

NS, DEP = KubeEnv.NAMESPACE, KubeEnv.DEPLOYMENT
ROOT = Path(__file__).resolve().parent.parent
FAILING = {"name": "failing", "faults": [{"endpoints": 1, "errorRate": 1}], "windows": 1}


@pytest.fixture
def env(kube: KubeEnv) -> KubeEnv:
    kube.seed()
    return kube


def _target(env: KubeEnv, tmp_path: Path, store: DictStore | None = None, *, faults: bool = True,
            parameters: dict[str, Any] | None = None, **target: Any) -> KubernetesTarget:
    overrides: dict[str, Any] = {"scenarios": [{"name": "steady"}, FAILING] if faults else [{"name": "steady"}]}
    if parameters is not None:
        overrides["parameters"] = parameters
    spec = small_spec(tmp_path, target=env.target_data(**target), **overrides)
    tgt = make_target(spec)
    assert isinstance(tgt, KubernetesTarget)
    tgt.check_supported(spec.search_space())
    if store is not None:
        tgt.bind_state(store)
    return tgt


def _copies(fake: FakeCluster) -> dict[str, dict[str, Any]]:
    with fake.lock:
        return {name: d for (ns, name), d in fake.deployments.items()
                if ns == NS and FAULT_LABEL in (d["metadata"].get("labels") or {})}


def _fault_pods(fake: FakeCluster) -> list[str]:
    """Every pod of a copy still listed, terminating or not."""
    with fake.lock:
        return [p["metadata"]["name"] for p in fake._pods(NS, consume=False)
                if FAULT_LABEL in p["metadata"]["labels"]]


# -- misbehaving replicas ----------------------------------------------------------------------


def test_faults_become_copies_of_the_service_deployment_behind_the_same_service(
        env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    with fake.lock:  # the user's Deployment has probes and an env of its own
        container = fake.deployments[(NS, DEP)]["spec"]["template"]["spec"]["containers"][0]
        container["env"] = [{"name": "MODE", "value": "prod"}, {"name": ENV_ERROR_RATE, "value": "0.9"}]
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}}
    with _target(env, tmp_path) as tgt:
        tgt.set_service_faults([EndpointFault(endpoints=2, delay_ms=50),
                                EndpointFault(endpoints=1, error_rate=0.5)])
        copies = _copies(fake)
        assert sorted(copies) == ["web-fault-0", "web-fault-1"]
        slow, failing = copies["web-fault-0"], copies["web-fault-1"]
        assert (slow["spec"]["replicas"], failing["spec"]["replicas"]) == (2, 1)
        assert slow["status"]["availableReplicas"] == 2  # waited for like kubectl rollout status
        tpl = failing["spec"]["template"]
        assert tpl["metadata"]["labels"]["app"] == "web"  # the Service's selector picks it
        (c,) = tpl["spec"]["containers"]
        assert "readinessProbe" not in c
        assert {e["name"]: e["value"] for e in c["env"]} == {
            "MODE": "prod", "AUTOTUNE_FAULT_DELAY_MS": "0", "AUTOTUNE_FAULT_SERVICE_TIME_FACTOR": "1",
            "AUTOTUNE_FAULT_ERROR_RATE": "0.5", "AUTOTUNE_FAULT_RESET_RATE": "0",
            "AUTOTUNE_FAULT_REFUSE_CONNECTIONS": "false"}
        assert failing["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "autotune"
        endpoints = [p["metadata"]["name"] for p in fake.endpoints(NS, KubeEnv.SERVICE)]
        assert len(endpoints) == 2 + 2 + 1 and sum(n.startswith("web-fault-") for n in endpoints) == 3
        # the tuned Deployment's own pods are still the ones observed
        assert set(tgt.observed().details["pods"]) == {n for n in endpoints if not n.startswith("web-fault-")}

        tgt.set_service_faults(())
        assert _copies(fake) == {} and _fault_pods(fake) == []  # returned once the pods were gone
        assert len(fake.endpoints(NS, KubeEnv.SERVICE)) == 2
    deletes = [r.path for r in fake.calls("DELETE", "/deployments/")]
    assert sorted(deletes) == [f"/apis/apps/v1/namespaces/{NS}/deployments/web-fault-{i}" for i in (0, 1)]


def test_a_misbehaving_replica_answers_its_share_of_the_traffic_with_errors(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    with _target(env, tmp_path) as tgt:
        assert burst(tgt.load_url, 12) == Counter({200: 12})
        tgt.set_service_faults([EndpointFault(endpoints=1, error_rate=1.0)])
        statuses = burst(tgt.load_url, 12)
        assert statuses == Counter({200: 8, 503: 4}), statuses  # round robin over 2 healthy + 1 failing
        (pod,) = [p for p in fake.fault_replies if p.startswith("web-fault-0-")]
        assert fake.fault_replies == {pod: 4}
        tgt.set_service_faults(())
        assert burst(tgt.load_url, 12) == Counter({200: 12})


def test_a_crashed_runs_replicas_are_removed_by_the_next_start(
        env: KubeEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = env.cluster
    store = DictStore()
    crashed = _target(env, tmp_path, store)
    crashed.start()
    crashed.set_service_faults([EndpointFault(endpoints=2, reset_rate=0.2)])
    crashed._release()  # the process dies here: nothing is restored
    assert list(_copies(fake)) == ["web-fault-0"]

    again = _target(env, tmp_path, store, faults=False)  # even a spec without faults cleans up
    with caplog.at_level(logging.WARNING):
        again.start()
    assert _copies(fake) == {} and _fault_pods(fake) == []
    assert "removed the misbehaving replicas a previous run left: web-fault-0" in caplog.text
    again.close()
    assert store.data[STATE_KEY] is None


def test_restore_and_close_remove_the_replicas(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    tgt = _target(env, tmp_path)
    tgt.start()
    tgt.set_service_faults([EndpointFault(endpoints=1, delay_ms=10)])
    tgt.restore()
    assert _copies(fake) == {} and _fault_pods(fake) == []
    tgt.set_service_faults([EndpointFault(endpoints=1, delay_ms=10)])
    tgt.close()
    assert _copies(fake) == {} and _fault_pods(fake) == []


@pytest.mark.parametrize(("breakage", "message"), [
    ("selector", "service backend's selector {'app': 'other'} does not select the pods of deployment web"),
    ("deployment", "deployment nope (the service's backend, which scenario faults copy) not found"),
    ("service", "service backend (service.name) not found in namespace staging"),
    ("rbac", "does not allow: verb 'create' on 'deployments' (API group 'apps')"),
])
def test_preflight_checks_what_faults_need(env: KubeEnv, tmp_path: Path, breakage: str, message: str) -> None:
    fake = env.cluster
    extra: dict[str, Any] = {}
    if breakage == "selector":
        fake.add_service(NS, KubeEnv.SERVICE, {"app": "other"})
    elif breakage == "deployment":
        extra["serviceDeployment"] = "nope"
    elif breakage == "service":
        del fake.services[(NS, KubeEnv.SERVICE)]
    else:
        fake.forbidden.add(("create", "deployments"))
    with pytest.raises(TargetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _target(env, tmp_path, **extra).start()
    with _target(env, tmp_path, faults=False, **extra):
        pass  # without faults none of this is needed


# -- RBAC: the shipped Role ----------------------------------------------------------------------


def _shipped_rbac() -> list[dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "autotune" / "rbac.yaml").read_text()))
    return [d for d in docs if d["kind"] in ("Role", "ClusterRole")]


def test_the_shipped_role_allows_everything_a_study_with_faults_does(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    fake.use_role(*_shipped_rbac())
    with _target(env, tmp_path) as tgt:
        tgt.apply(MeshConfig(max_connections=8, consecutive_5xx_errors=3, lb_simple="RANDOM", cpu_limit=0.5))
        tgt.wait_ready(10)
        tgt.set_service_faults([EndpointFault(endpoints=1, error_rate=1.0)])
        tgt.set_service_faults(())
    assert _copies(fake) == {}
    # tuning route settings needs the virtualservices rule the README describes
    with pytest.raises(TargetError, match="verb 'get' on 'virtualservices'"):
        _target(env, tmp_path, parameters={"retries.attempts": {"low": 0, "high": 3}}).start()


# -- VirtualService: route settings -------------------------------------------------------------

RETRIES = {"retries.attempts": {"low": 0, "high": 5}, "retries.perTryTimeout": {"low": "10ms", "high": "2s"}}


def _assert_valid_vs(vs: dict[str, Any] | None) -> None:
    assert vs is not None
    jsonschema.validate({"spec": vs["spec"]}, strict_vs_schema("v1"))


def test_every_virtual_service_the_target_writes_validates_against_the_crd(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    configs = [MeshConfig(retry_attempts=a, per_try_timeout_ms=t)
               for a in (None, 0, 1, 5) for t in (None, 10, 250, 1000, 2000) if (a, t) != (None, None)]
    with _target(env, tmp_path, faults=False, parameters=RETRIES) as tgt:
        for config in configs:
            tgt.apply(config)  # the fake refuses (422/400) what the CRD, its CEL rules or Strict refuse
            vs = fake.vs(NS, KubeEnv.SERVICE)
            _assert_valid_vs(vs)
            assert vs is not None
            assert [r["retries"] for r in vs["spec"]["http"]] == [mesh.http_retries(config)]
            assert vs["spec"]["hosts"] == [KubeEnv.HOST]
            assert vs["spec"]["http"][0]["route"][0]["destination"]["host"] == KubeEnv.HOST
        (create,) = fake.calls("POST", "/virtualservices")
        assert create.query == {"fieldManager": "autotune", "fieldValidation": "Strict"}
        assert len(fake.calls("PATCH", "/virtualservices")) == len(configs) - 1
        tgt.apply(MeshConfig())  # no route setting: autotune's VirtualService goes, Istio's default route applies
        assert fake.vs(NS, KubeEnv.SERVICE) is None
        tgt.apply(MeshConfig(retry_attempts=2))
        assert fake.vs(NS, KubeEnv.SERVICE) is not None
    assert fake.vs(NS, KubeEnv.SERVICE) is None  # restored: it did not exist


def test_an_existing_virtual_service_gets_the_retries_on_every_route_and_is_reverted(
        env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    user = {"hosts": [KubeEnv.HOST], "http": [
        {"match": [{"uri": {"prefix": "/api"}}], "route": [{"destination": {"host": KubeEnv.HOST}}],
         "timeout": "5s", "retries": {"attempts": 1, "retryOn": "5xx"}},
        {"route": [{"destination": {"host": KubeEnv.HOST}}]}]}
    fake.add_virtual_service(NS, "routes", user)
    store = DictStore()
    crashed = _target(env, tmp_path, store, faults=False, parameters=RETRIES, virtualService="routes")
    crashed.start()
    crashed.apply(MeshConfig(retry_attempts=4, per_try_timeout_ms=300))
    vs = fake.vs(NS, "routes")
    _assert_valid_vs(vs)
    assert vs is not None
    assert [r.get("retries") for r in vs["spec"]["http"]] == [{"attempts": 4, "perTryTimeout": "300ms"}] * 2
    assert vs["spec"]["http"][0]["timeout"] == "5s" and vs["spec"]["http"][0]["match"] == user["http"][0]["match"]
    crashed.apply(MeshConfig())  # left out: Istio's default retry policy (no retries block)
    assert [r.get("retries") for r in fake.vs(NS, "routes")["spec"]["http"]] == [None, None]  # type: ignore[index]
    crashed.apply(MeshConfig(retry_attempts=1))
    crashed._release()  # crash: the snapshot in the study still holds the user's VirtualService

    again = _target(env, tmp_path, store, faults=False, parameters=RETRIES, virtualService="routes")
    again.start()
    assert fake.vs(NS, "routes")["spec"] == user  # type: ignore[index]
    again.apply(MeshConfig(retry_attempts=3))
    again.close()
    assert fake.vs(NS, "routes")["spec"] == user  # type: ignore[index]
    assert store.data[STATE_KEY] is None


# -- DestinationRule and pod knobs ---------------------------------------------------------------

DR_KNOBS = {"outlierDetection.consecutive5xxErrors": {"low": 0, "high": 10},
            "outlierDetection.interval": {"low": "100ms", "high": "10s"},
            "outlierDetection.baseEjectionTime": {"low": "1s", "high": "60s"},
            "outlierDetection.maxEjectionPercent": {"low": 10, "high": 100},
            "loadBalancer.simple": {"choices": ["ROUND_ROBIN", "RANDOM"]},
            "connectionPool.http.idleTimeout": {"low": "1s", "high": "1h"},
            "connectionPool.tcp.connectTimeout": {"low": "100ms", "high": "10s"},
            "connectionPool.tcp.maxConnections": {"low": 1, "high": 100}}


def test_destination_rule_knobs_are_written_as_istio_reads_them_and_the_users_other_fields_kept(
        env: KubeEnv, tmp_path: Path) -> None:
    env.seed(traffic_policy={"connectionPool": {"http": {"h2UpgradePolicy": "DO_NOT_UPGRADE"}},
                             "tls": {"mode": "ISTIO_MUTUAL"},
                             "outlierDetection": {"splitExternalLocalOriginErrors": True}})
    fake = env.cluster
    config = MeshConfig(max_connections=9, idle_timeout_ms=30000, connect_timeout_ms=250, consecutive_5xx_errors=3,
                        outlier_interval_ms=500, base_ejection_time_ms=5000, max_ejection_percent=50,
                        lb_simple="RANDOM")
    with _target(env, tmp_path, faults=False, parameters=DR_KNOBS) as tgt:
        tgt.apply(config)
        policy = fake.dr(NS, KubeEnv.DR)["spec"]["trafficPolicy"]  # type: ignore[index]
        assert policy == {
            "connectionPool": {"http": {"h2UpgradePolicy": "DO_NOT_UPGRADE", "idleTimeout": "30s"},
                               "tcp": {"maxConnections": 9, "connectTimeout": "250ms"}},
            "tls": {"mode": "ISTIO_MUTUAL"},
            "outlierDetection": {"splitExternalLocalOriginErrors": True, "consecutive5xxErrors": 3,
                                 "interval": "500ms", "baseEjectionTime": "5s", "maxEjectionPercent": 50},
            "loadBalancer": {"simple": "RANDOM"}}
        jsonschema.validate({"spec": fake.dr(NS, KubeEnv.DR)["spec"]}, strict_dr_schema("v1"))  # type: ignore[index]
        tgt.apply(MeshConfig(max_ejection_percent=20))  # the rest of the space back at Istio's default
        assert fake.dr(NS, KubeEnv.DR)["spec"]["trafficPolicy"] == {  # type: ignore[index]
            "connectionPool": {"http": {"h2UpgradePolicy": "DO_NOT_UPGRADE"}}, "tls": {"mode": "ISTIO_MUTUAL"},
            "outlierDetection": {"splitExternalLocalOriginErrors": True, "maxEjectionPercent": 20}}
    assert fake.dr(NS, KubeEnv.DR)["spec"]["trafficPolicy"]["outlierDetection"] == {  # type: ignore[index]
        "splitExternalLocalOriginErrors": True}


def test_cpu_request_and_no_cpu_limit_go_through_the_sidecar_annotations(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    params = {"proxy.cpuRequest": {"low": "50m", "high": "100m"},
              "proxy.cpuLimit": {"low": "100m", "high": "1", "unset": True}}
    with _target(env, tmp_path, faults=False, parameters=params) as tgt:
        tgt.apply(MeshConfig(cpu_request=0.05, no_cpu_limit=True))
        tgt.wait_ready(10)
        ann = fake.annotations(NS, DEP)
        assert ann["sidecar.istio.io/proxyCPU"] == "50m" and "sidecar.istio.io/proxyCPULimit" not in ann
        pod = fake.running_pods(NS)[0]
        (proxy,) = [c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy"]
        assert proxy["resources"]["requests"]["cpu"] == "50m" and "cpu" not in proxy["resources"]["limits"]
        observed = tgt.observed()
        assert observed.cpu_limit == float(os.cpu_count() or 1)  # no limit: the node's cores
        assert not observed.differences(type(observed).expected(MeshConfig(cpu_request=0.05, no_cpu_limit=True)))


# -- a study: the replica exists during its scenario's windows only ------------------------------


class _Watching:
    """Locust, recording at each window's start which copies exist and how many endpoints serve."""

    def __init__(self, fake: FakeCluster) -> None:
        self.fake, self.inner = fake, LocustDriver()
        self.seen: list[tuple[int, list[str], int]] = []

    def run(self, url: str, load: LoadSpec, **kw: Any) -> Any:
        start = kw.pop("on_window_start")

        def watch(i: int) -> None:
            copies = {n: d["status"].get("availableReplicas") for n, d in _copies(self.fake).items()}
            self.seen.append((load.users, sorted(f"{n}:{a}" for n, a in copies.items()),
                              len(self.fake.endpoints(NS, KubeEnv.SERVICE))))
            start(i)

        return self.inner.run(url, load, on_window_start=watch, **kw)


def test_a_study_creates_the_scenarios_replica_before_its_windows_and_removes_it_after(
        env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    spec = small_spec(tmp_path, target=env.target_data(), **{
        "study.trials": 2, "load.users": 4, "load.ratePerUser": 10, "timing.warmup": 0.5, "timing.window": 2,
        "scenarios": [{"name": "steady"}, {**FAILING, "load": {"users": 3, "ratePerUser": 10}}],
        "constraints": {"maxErrorRate": 0.01, "failing": {"maxErrorRate": 0.5}}})
    watching = _Watching(fake)
    study = run_study(spec, load=watching)  # type: ignore[arg-type]
    assert watching.seen == [(4, [], 2), (3, ["web-fault-0:1"], 3)] * 2  # steady then failing, per trial
    assert _copies(fake) == {} and _fault_pods(fake) == []
    for trial in study.get_trials():
        assert trial.state.name == "COMPLETE"
        assert trial.user_attrs["steady.error_rate"] == 0
        # one endpoint of three answers 503 to everything it gets (round robin)
        assert trial.user_attrs["failing.error_rate"] == pytest.approx(1 / 3, abs=0.08)
    assert len(fake.calls("POST", "/deployments")) == 2  # one copy per trial's failing scenario
