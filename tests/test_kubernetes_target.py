"""The Kubernetes target against a fake API server spoken to by the real ``kubernetes`` client.

Wire format (content types, bodies, query parameters), rollout waiting, pre-flight refusals, API
errors, restore after a study, a failed trial and a crash, and one whole study whose load goes to
a local HTTP server and whose CPU comes from a real Prometheus scraping the fake kubelet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from _specs import small_spec
from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.mesh import MeshConfig, SidecarResources
from autotune.study import run_single, run_study
from autotune.targets import make_target
from autotune.targets.kubernetes import KubernetesTarget
from autotune.targets.kubernetes._snapshot import STATE_KEY
from fake_k8s import DictStore, FakeCluster, KubeEnv, _pod_invalid, kube_env

NS, DEP, DR = KubeEnv.NAMESPACE, KubeEnv.DEPLOYMENT, KubeEnv.DR
HOLD = "holdApplicationUntilProxyStarts: true\n"
DR_PATH = f"/apis/networking.istio.io/v1/namespaces/{NS}/destinationrules"
DEP_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEP}"


@pytest.fixture
def env(kube: KubeEnv) -> KubeEnv:
    kube.seed(annotations={"proxy.istio.io/config": HOLD}, traffic_policy={
        "connectionPool": {"tcp": {"connectTimeout": "250ms"}}, "loadBalancer": {"simple": "ROUND_ROBIN"}})
    return kube


@pytest.fixture
def fake(env: KubeEnv) -> FakeCluster:
    return env.cluster


def _target(env: KubeEnv, tmp_path: Path, store: DictStore | None = None, rollout_timeout: float = 10,
            window: float = 2, xds_push: float = 0, **overrides: Any) -> KubernetesTarget:
    tgt = make_target(small_spec(tmp_path, target=env.target_data(**overrides),
                                 **{"timing.rolloutTimeout": rollout_timeout, "timing.window": window,
                                    "timing.xdsPush": xds_push}))
    assert isinstance(tgt, KubernetesTarget)
    if store is not None:
        tgt.bind_state(store)
    return tgt


@pytest.fixture
def target(env: KubeEnv, tmp_path: Path) -> Iterator[KubernetesTarget]:
    tgt = _target(env, tmp_path)
    tgt.start()
    try:
        yield tgt
    finally:
        tgt.close()


def _baseline_state(fake: FakeCluster) -> tuple[dict[str, str], Any]:
    return fake.annotations(NS, DEP), (fake.dr(NS, DR) or {}).get("spec")


# -- wire format -------------------------------------------------------------------------------


def test_patches_are_merge_patches_with_field_manager_and_strict_validation(
        target: KubernetesTarget, fake: FakeCluster) -> None:
    fake.requests.clear()
    target.apply(MeshConfig(max_connections=64, http2_max_requests=100, concurrency=2, cpu_limit=0.5))
    (dr_patch,) = fake.calls("PATCH", DR_PATH)
    (dep_patch,) = fake.calls("PATCH", DEP_PATH)
    for req in (dr_patch, dep_patch):
        assert req.content_type == "application/merge-patch+json"
        assert req.query == {"fieldManager": "autotune", "fieldValidation": "Strict"}
    assert dr_patch.body == {"spec": {"trafficPolicy": {"connectionPool": {
        "tcp": {"maxConnections": 64}, "http": {"http2MaxRequests": 100}}}}}
    assert dep_patch.body == {"spec": {"template": {"metadata": {"annotations": {
        "proxy.istio.io/config": HOLD + "concurrency: 2\n",
        "sidecar.istio.io/proxyCPU": "100m", "sidecar.istio.io/proxyCPULimit": "500m",
        "sidecar.istio.io/proxyMemory": "128Mi", "sidecar.istio.io/proxyMemoryLimit": "1024Mi"}}}}}
    # the user's other DR fields survive; a left-out field goes back to Istio's default with null
    target.apply(MeshConfig(http2_max_requests=100, concurrency=2, cpu_limit=0.5))
    assert fake.calls("PATCH", DR_PATH)[-1].body == {"spec": {"trafficPolicy": {"connectionPool": {
        "tcp": {"maxConnections": None}}}}}
    spec = fake.dr(NS, DR)["spec"]  # type: ignore[index]
    assert spec["trafficPolicy"] == {"connectionPool": {"tcp": {"connectTimeout": "250ms"},
                                                        "http": {"http2MaxRequests": 100}},
                                     "loadBalancer": {"simple": "ROUND_ROBIN"}}
    assert not any(r.path.startswith("/api") and "/production" in r.path for r in fake.requests)


def test_a_missing_destination_rule_is_created_and_deleted_again(env: KubeEnv, tmp_path: Path) -> None:
    env.seed(dr=False)
    fake = env.cluster
    with _target(env, tmp_path) as tgt:
        tgt.apply(MeshConfig(max_connections=8))
        (create,) = fake.calls("POST", DR_PATH)
        assert create.content_type == "application/json"
        assert create.query == {"fieldManager": "autotune", "fieldValidation": "Strict"}
        assert create.body["spec"] == {"host": KubeEnv.HOST,
                                       "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 8}}}}
        assert create.body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "autotune"}
    assert fake.dr(NS, DR) is None
    assert fake.dr("production", DR) is None  # another namespace's objects are never touched
    assert not any("/production" in r.path for r in fake.requests)


def test_a_destination_rule_only_change_does_not_restart_pods(target: KubernetesTarget, fake: FakeCluster) -> None:
    target.apply(MeshConfig(max_connections=10, cpu_limit=0.5))
    target.wait_ready(10)
    generation = fake.deployment(NS, DEP)["metadata"]["generation"]
    fake.requests.clear()
    target.apply(MeshConfig(max_connections=20, cpu_limit=0.5))
    target.wait_ready(10)
    assert fake.calls("PATCH", DEP_PATH) == []
    assert fake.deployment(NS, DEP)["metadata"]["generation"] == generation
    assert fake.dr(NS, DR)["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] == 20  # type: ignore[index]


def test_concurrency_is_merged_into_the_existing_proxy_config(target: KubernetesTarget, fake: FakeCluster) -> None:
    target.apply(MeshConfig(concurrency=3))
    doc = yaml.safe_load(fake.annotations(NS, DEP)["proxy.istio.io/config"])
    assert doc == {"holdApplicationUntilProxyStarts": True, "concurrency": 3}
    target.wait_ready(10)
    assert target.observed().concurrency == 3  # read from the running pods
    target.apply(MeshConfig())  # concurrency unset: removed, the user's key kept
    assert yaml.safe_load(fake.annotations(NS, DEP)["proxy.istio.io/config"]) == {
        "holdApplicationUntilProxyStarts": True}
    target.restore()
    assert fake.annotations(NS, DEP) == {"proxy.istio.io/config": HOLD}  # byte for byte


# -- rollout -----------------------------------------------------------------------------------


def test_wait_ready_follows_the_rollout_from_the_patched_generation(
        target: KubernetesTarget, fake: FakeCluster) -> None:
    old_hash = target.observed().details["pod_template_hash"]
    target.apply(MeshConfig(cpu_limit=0.25))
    fake.requests.clear()
    target.wait_ready(10)
    gets = fake.calls("GET", DEP_PATH)
    assert len(gets) >= 5  # lagging observedGeneration, updated < desired, old pending, unavailable, done
    status = fake.deployment(NS, DEP)["status"]
    assert status["observedGeneration"] == 2 and status["availableReplicas"] == status["updatedReplicas"] == 2
    pod_list = fake.calls("GET", f"/api/v1/namespaces/{NS}/pods")[-1]
    assert pod_list.query == {"labelSelector": "app=web,!autotune.io/fault-replica"}  # not the misbehaving copies
    new_hash = target.observed().details["pod_template_hash"]
    assert new_hash and new_hash != old_hash  # the terminating old pods were not counted


@pytest.mark.parametrize(("mode", "expected"), [
    ("ReplicaFailure", 'admission webhook "sidecar-injector.istio.io" denied the request'),
    ("ProgressDeadlineExceeded", "has timed out progressing"),
])
def test_a_failing_rollout_fails_the_trial_at_once_with_its_message(
        target: KubernetesTarget, fake: FakeCluster, mode: str, expected: str) -> None:
    fake.rollout_mode = mode
    target.apply(MeshConfig(cpu_limit=0.3))
    t0 = time.monotonic()
    with pytest.raises(TrialFailed) as exc:
        target.wait_ready(10)
    assert exc.value.reason == "rollout-failed"
    assert expected in str(exc.value)
    assert time.monotonic() - t0 < 2
    fake.rollout_mode = None  # so that the restore at close can roll out


def test_a_hanging_rollout_times_out_as_not_ready(env: KubeEnv, tmp_path: Path) -> None:
    env.cluster.rollout_mode = "hang"
    tgt = _target(env, tmp_path, rollout_timeout=0.5)
    tgt.start()
    tgt.apply(MeshConfig(cpu_limit=0.3))
    with pytest.raises(TrialFailed) as exc:
        tgt.wait_ready(10)
    assert exc.value.reason == "not-ready"
    assert "1 of 2 new replicas updated" in str(exc.value)
    env.cluster.rollout_mode = None
    tgt.close()
    assert env.cluster.annotations(NS, DEP) == {"proxy.istio.io/config": HOLD}


# -- pre-flight --------------------------------------------------------------------------------


def test_an_unlabelled_namespace_is_refused_with_the_command_to_label_it(env: KubeEnv, tmp_path: Path) -> None:
    env.seed(labelled=False)
    with pytest.raises(TargetError, match=r"kubectl label namespace staging autotune\.io/staging=true"):
        _target(env, tmp_path).start()
    assert env.cluster.calls("PATCH") == []


@pytest.mark.parametrize(("breakage", "message"), [
    ("no-deployment", "deployment web not found in namespace staging"),
    ("no-istio", "Istio's CRDs are not installed"),
    ("no-namespace", "namespace staging does not exist"),
    ("rbac", "does not allow: verb 'patch' on 'deployments' (API group 'apps')"),
    ("rbac-namespace", "RBAC does not allow verb 'get' on resource 'namespaces'"),
])
def test_preflight_says_what_to_fix(env: KubeEnv, tmp_path: Path, breakage: str, message: str) -> None:
    fake = env.cluster
    if breakage == "no-deployment":
        del fake.deployments[(NS, DEP)]
    elif breakage == "no-istio":
        fake.istio_installed = False
    elif breakage == "no-namespace":
        del fake.namespaces[NS]
    elif breakage == "rbac":
        fake.forbidden.add(("patch", "deployments"))
    else:
        fake.forbidden.add(("get", "namespaces"))
    tgt = _target(env, tmp_path, store=(store := DictStore()))
    with pytest.raises(TargetError) as exc:
        tgt.start()
    assert message in str(exc.value)
    assert store.data == {}
    tgt.close()


def test_an_unreachable_prometheus_is_a_preflight_error(env: KubeEnv, tmp_path: Path) -> None:
    tgt = _target(env, tmp_path, prometheus={"url": "http://127.0.0.1:9", "timeout": 2, "scrapeInterval": 0.25})
    with pytest.raises(TargetError, match=r"127\.0\.0\.1:9"):
        tgt.start()


# -- API errors during a trial -------------------------------------------------------------------


def test_api_errors_become_trial_failures_with_the_server_message(target: KubernetesTarget,
                                                                 fake: FakeCluster) -> None:
    fake.forbidden.add(("patch", "destinationrules"))
    with pytest.raises(TrialFailed) as exc:
        target.apply(MeshConfig(max_connections=5))
    assert exc.value.reason == "api"
    assert "verb 'patch' on resource 'destinationrules' in API group 'networking.istio.io'" in str(exc.value)
    fake.forbidden.clear()

    fake.fail("patch", "deployments", 422, 'Deployment.apps "web" is invalid: spec.template: bad', times=1)
    with pytest.raises(TrialFailed) as exc:
        target.apply(MeshConfig(cpu_limit=0.5))
    assert exc.value.reason == "rejected" and 'Deployment.apps "web" is invalid' in str(exc.value)

    with pytest.raises(TrialFailed) as exc:  # Istio's webhook refuses negative limits
        target.apply(MeshConfig(max_connections=-1))
    assert exc.value.reason == "rejected" and "validation.istio.io" in str(exc.value)

    fake.fail("get", "deployments", 401, "Unauthorized")
    with pytest.raises(TrialFailed, match="401 Unauthorized"):
        target.apply(MeshConfig(cpu_limit=0.5))


def test_a_conflict_is_retried_once(target: KubernetesTarget, fake: FakeCluster) -> None:
    fake.fail("patch", "destinationrules", 409, "the object has been modified", times=1)
    target.apply(MeshConfig(max_connections=5))
    assert len(fake.calls("PATCH", DR_PATH)) == 2
    assert fake.dr(NS, DR)["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] == 5  # type: ignore[index]
    fake.fail("patch", "destinationrules", 409, "the object has been modified", times=2)
    with pytest.raises(TrialFailed, match="409 Conflict"):
        target.apply(MeshConfig(max_connections=6))


def test_a_stale_resource_version_is_a_conflict_in_the_fake(fake: FakeCluster, target: KubernetesTarget) -> None:
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=target.spec.kubeconfig))
    patch = {"metadata": {"resourceVersion": "1"}, "spec": {"trafficPolicy": {"foo": 1}}}
    with pytest.raises(client.ApiException) as exc:
        api.patch_namespaced_custom_object("networking.istio.io", "v1", NS, "destinationrules", DR, patch)
    assert exc.value.status == 409
    del patch["metadata"]
    with pytest.raises(client.ApiException) as exc:  # unknown field under Strict validation
        api.patch_namespaced_custom_object("networking.istio.io", "v1", NS, "destinationrules", DR, patch,
                                           field_validation="Strict")
    assert exc.value.status == 400 and "strict decoding error" in str(exc.value.body)
    bad = {"spec": {"trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": "many"}}}}}
    with pytest.raises(client.ApiException) as exc:  # schema type violation
        api.patch_namespaced_custom_object("networking.istio.io", "v1", NS, "destinationrules", DR, bad)
    assert exc.value.status == 422


def test_an_api_timeout_fails_the_trial(env: KubeEnv, tmp_path: Path) -> None:
    tgt = _target(env, tmp_path, requestTimeout=0.3)
    tgt.start()
    env.cluster.delay_s[("patch", "destinationrules")] = 1.0
    with pytest.raises(TrialFailed) as exc:
        tgt.apply(MeshConfig(max_connections=5))
    assert exc.value.reason == "api-timeout"
    env.cluster.delay_s.clear()
    time.sleep(1.0)  # the timed-out PATCH still lands on the server, as it may on a real one
    assert env.cluster.dr(NS, DR)["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] == 5  # type: ignore[index]
    tgt.close()  # restore reads the state back, so it undoes the late write too
    assert "maxConnections" not in env.cluster.dr(NS, DR)["spec"]["trafficPolicy"]["connectionPool"]["tcp"]  # type: ignore[index]


# -- restore -----------------------------------------------------------------------------------


def test_restore_after_a_failed_trial_puts_the_baseline_back(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    before = _baseline_state(fake)
    store = DictStore()
    tgt = _target(env, tmp_path, store=store)
    tgt.start()
    assert store.data[STATE_KEY]["annotations"]["proxy.istio.io/config"] == HOLD
    fake.rollout_mode = "ReplicaFailure"
    tgt.apply(MeshConfig(max_connections=3, concurrency=1, cpu_limit=0.02))
    with pytest.raises(TrialFailed):
        tgt.wait_ready(10)
    fake.rollout_mode = None
    tgt.restore()
    tgt.restore()  # idempotent: nothing left to patch
    assert _baseline_state(fake) == before
    assert fake.deployment(NS, DEP)["status"]["observedGeneration"] == fake.deployment(NS, DEP)["metadata"][
        "generation"]
    patches = len(fake.calls("PATCH"))
    tgt.close()
    assert len(fake.calls("PATCH")) == patches
    assert store.data[STATE_KEY] is None


def test_the_next_start_restores_what_a_crashed_run_left(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    before = _baseline_state(fake)
    store = DictStore()
    crashed = _target(env, tmp_path, store=store)
    crashed.start()
    crashed.apply(MeshConfig(max_connections=3, concurrency=1, cpu_limit=0.1))
    crashed.wait_ready(10)
    snapshot = store.data[STATE_KEY]
    assert _baseline_state(fake) != before  # the process dies here without restoring

    again = _target(env, tmp_path, store=store)
    again.start()
    assert _baseline_state(fake) == before
    assert store.data[STATE_KEY] == snapshot  # still the original baseline, not the crashed trial
    again.apply(MeshConfig(max_connections=9))
    again.close()
    assert _baseline_state(fake) == before
    assert store.data[STATE_KEY] is None


def test_without_a_store_the_snapshot_is_kept_in_memory(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    before = _baseline_state(fake)
    spec = small_spec(tmp_path, target=env.target_data(), **{"timing.window": 1.5, "timing.warmup": 0.5})
    measurement = run_single(spec, MeshConfig(max_connections=4, cpu_limit=0.5))
    assert measurement.metrics["cpu_cores"] == pytest.approx(2 * fake.proxy_cpu_cores, rel=0.4)
    assert _baseline_state(fake) == before


# -- a whole study -----------------------------------------------------------------------------


def test_a_study_on_the_fake_cluster_measures_cpu_from_prometheus_and_restores(
        env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    before = _baseline_state(fake)
    spec = small_spec(tmp_path, target=env.target_data(), **{
        "study.trials": 3, "load.users": 4, "load.ratePerUser": 10, "timing.warmup": 0.5, "timing.window": 2})
    study = run_study(spec)
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        # two pods × 0.05 cores of istio-proxy; the app container and production are not counted
        assert t.user_attrs["cpu_cores"] == pytest.approx(2 * fake.proxy_cpu_cores, rel=0.4)
        assert t.user_attrs["cpu_throttled_ratio"] == pytest.approx(fake.proxy_throttled_ratio, abs=0.05)
        assert t.user_attrs["error_rate"] == 0
        wanted = MeshConfig.from_params(t.params)  # read back from the running pods' sidecars
        assert t.user_attrs["observed"]["cpu_limit"] == pytest.approx(wanted.effective_cpu_limit, abs=0.001)
        assert t.user_attrs["observed"]["concurrency"] == wanted.effective_concurrency
    assert _baseline_state(fake) == before
    assert study.user_attrs.get(f"target.{STATE_KEY}") is None
    assert not any("/production" in r.path for r in fake.requests if r.method != "GET")


class _CtrlCInTrial:
    """Ctrl-C in the middle of the n-th trial's measurement window."""

    def __init__(self, n: int) -> None:
        self.n, self.started = n, 0

    def study_started(self, *args: Any) -> None: ...

    def trial_started(self, *args: Any, **kwargs: Any) -> None:
        self.started += 1

    def phase(self, name: str, fraction: float) -> None:
        if self.started == self.n and name.startswith("measure") and fraction > 0.2:
            raise KeyboardInterrupt

    def trial_finished(self, *args: Any) -> None: ...


def test_ctrl_c_restores_the_cluster_and_the_study_resumes(env: KubeEnv, tmp_path: Path) -> None:
    fake = env.cluster
    before = _baseline_state(fake)
    spec = small_spec(tmp_path, target=env.target_data(), **{
        "study.trials": 2, "load.users": 4, "load.ratePerUser": 10, "timing.warmup": 0.5, "timing.window": 2})
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, _CtrlCInTrial(2))  # type: ignore[arg-type]
    assert _baseline_state(fake) == before
    study = run_study(spec)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert _baseline_state(fake) == before


def test_the_shipped_example_spec_runs_through_the_cli(env: KubeEnv, tmp_path: Path) -> None:
    """search-spaces/k8s-staging.yaml, pointed at the fake cluster, as a user would start it."""
    from click.testing import CliRunner

    from autotune.cli import main

    repo = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((repo / "search-spaces" / "k8s-staging.yaml").read_text())
    prometheus = env.target_data()["prometheus"]
    data["target"] = {**data["target"], **env.target_data(), "prometheus": prometheus}
    data["study"].update(storage=f"sqlite:///{tmp_path}/s.db", trials=2, resultsDir=str(tmp_path / "out"))
    data["load"].update(users=4, ratePerUser=10)
    data["timing"].update(warmup=0.5, window=2, xdsPush=0, rolloutTimeout=10)
    spec = tmp_path / "k8s.yaml"
    spec.write_text(yaml.safe_dump(data))
    before = _baseline_state(env.cluster)
    result = CliRunner().invoke(main, ["study", "start", str(spec)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Pareto front of k8s-staging" in result.output
    assert (tmp_path / "out" / "k8s-staging" / "pareto.csv").exists()
    assert _baseline_state(env.cluster) == before


def test_server_side_latency_comes_from_istio_histograms_when_asked(env: KubeEnv, tmp_path: Path) -> None:
    from fake_k8s import SERVER_LATENCY_BUCKETS

    assert SERVER_LATENCY_BUCKETS[3] == ("25", 1.0)  # p95 halfway into (10, 25]: 17.5 ms
    prometheus = {**env.target_data()["prometheus"], "serverLatency": True}
    spec = small_spec(tmp_path, target=env.target_data(prometheus=prometheus), **{
        "load.users": 4, "load.ratePerUser": 10, "timing.warmup": 0.5, "timing.window": 2})
    measured = run_single(spec, MeshConfig(concurrency=1))
    assert measured.metrics["server_latency_p95_ms"] == pytest.approx(17.5, rel=0.02)
    assert measured.metrics["server_latency_p99_ms"] == pytest.approx(23.5, rel=0.02)
    assert measured.metrics["latency_p95_ms"] > 0  # Locust's client-side figures stay available


# -- guarantees of the contract ------------------------------------------------------------------


def test_wait_ready_is_bounded_by_its_timeout_as_well_as_the_rollout_timeout(env: KubeEnv, tmp_path: Path) -> None:
    env.cluster.rollout_mode = "hang"
    tgt = _target(env, tmp_path, rollout_timeout=30)
    tgt.start()
    tgt.apply(MeshConfig(cpu_limit=0.3))
    t0 = time.monotonic()
    with pytest.raises(TrialFailed) as exc:
        tgt.wait_ready(0.5)
    assert exc.value.reason == "not-ready"
    assert time.monotonic() - t0 < 2  # min(0.5, rolloutTimeout=30) s, not 30 s
    env.cluster.rollout_mode = None
    tgt.close()


@pytest.mark.parametrize("stored", [{"version": 99}, {"version": 1, "namespace": "staging"}, "garbage"])
def test_an_unreadable_saved_baseline_is_a_target_error_naming_the_attribute(
        env: KubeEnv, tmp_path: Path, stored: Any) -> None:
    store = DictStore()
    store.data[STATE_KEY] = stored
    tgt = _target(env, tmp_path, store=store)
    with pytest.raises(TargetError, match=r"study user attribute 'target\.kubernetes\.snapshot'.*by hand"):
        tgt.start()
    assert env.cluster.calls("PATCH") == [] and store.data[STATE_KEY] == stored  # nothing touched
    tgt.close()


def test_a_window_includes_cpu_used_after_the_last_scrape_before_its_end(tmp_path: Path) -> None:
    """With a 2 s scrape interval, a burst of sidecar CPU between the last scrape before the
    window's end and that end is missed by a query evaluated at the end, not by the target."""
    from _prometheus import query

    interval, window, burst_s = 2.0, 8.0, 2.0
    with kube_env(tmp_path, scrape_interval_s=interval) as env:
        env.seed()
        fake = env.cluster
        fake.proxy_cpu_cores = 0.01
        tgt = _target(env, tmp_path, window=window)  # a window must span 4 scrape intervals
        tgt.start()
        try:
            (last,) = query(env.prometheus_url, "timestamp(up)")
            scrape = float(last["value"][1])
            while scrape < time.time() + window + 1:  # a scrape far enough ahead
                scrape += interval
            end, burst_at = scrape + 0.8 * interval, scrape + 0.15 * interval
            fake.add_proxy_cpu(burst_at, burst_s)  # per pod, between that scrape and the end
            time.sleep(max(0.0, end - window - time.time()))
            tgt.begin_window()
            time.sleep(max(0.0, end - time.time()))
            ended = time.time()
            usage = tgt.end_window()
        finally:
            tgt.close()
        # What a query evaluated at the window's end (the previous behaviour) sees.
        (at_end,) = query(env.prometheus_url, 'sum(rate(container_cpu_usage_seconds_total{namespace="staging",'
                          f'container="istio-proxy", pod=~"web-.*"}}[{round(usage.window_s)}s]))', at=ended)
    truth = 2 * (fake.proxy_cpu_cores + burst_s / usage.window_s)  # two pods
    assert float(at_end["value"][1]) < 0.3 * truth  # the burst is not in it
    # Interpolating across the first scrape after the end keeps ~0.8 of the burst in the window
    # (the uniform-rate assumption spreads it over that scrape interval).
    assert 0.65 * truth < usage.cpu_cores <= 1.05 * truth, (usage, truth)


# -- Istio's port-level pools and the sidecar's config ---------------------------------------------


def test_a_port_level_connection_pool_for_the_service_port_is_refused_at_start(kube: KubeEnv, tmp_path: Path) -> None:
    kube.seed(traffic_policy={"connectionPool": {"tcp": {"maxConnections": 100}}, "portLevelSettings": [
        {"port": {"number": 9090}, "connectionPool": {"tcp": {"maxConnections": 3}}},
        {"port": {"number": 8080}, "connectionPool": {"http": {"http1MaxPendingRequests": 5}}}]})
    before = _baseline_state(kube.cluster)
    tgt = _target(kube, tmp_path)
    with pytest.raises(TargetError, match=r"portLevelSettings\[1\] sets a connectionPool for port 8080") as info:
        tgt.start()
    assert "instead of spec.trafficPolicy.connectionPool" in str(info.value)
    assert "Move those connectionPool values" in str(info.value)
    assert _baseline_state(kube.cluster) == before
    assert kube.cluster.calls("PATCH") == []


def test_port_level_settings_for_another_port_or_without_a_pool_are_accepted(kube: KubeEnv, tmp_path: Path) -> None:
    kube.seed(traffic_policy={"portLevelSettings": [
        {"port": {"number": 9090}, "connectionPool": {"tcp": {"maxConnections": 3}}},
        {"port": {"number": 8080}, "loadBalancer": {"simple": "LEAST_REQUEST"}}]})
    tgt = _target(kube, tmp_path)
    tgt.start()
    tgt.close()


def test_a_destination_rule_change_that_never_reaches_the_sidecar_fails_as_not_propagated(
        env: KubeEnv, tmp_path: Path) -> None:
    tgt = _target(env, tmp_path, xds_push=0.5)
    tgt.start()
    try:
        env.cluster.freeze_sidecar()
        tgt.apply(MeshConfig(max_connections=7))
        t0 = time.monotonic()
        with pytest.raises(TrialFailed) as info:
            tgt.wait_ready(30)
        assert info.value.reason is FailReason.NOT_PROPAGATED
        assert "max_connections: 4294967295 != 7" in str(info.value)
        assert 0.5 <= time.monotonic() - t0 < 3  # xdsPush is the bound, not the ready timeout
    finally:
        tgt.close()


def test_wait_ready_returns_once_the_sidecar_has_the_config_not_after_xds_push(env: KubeEnv, tmp_path: Path) -> None:
    env.cluster.sidecar_delay_s = 0.4
    tgt = _target(env, tmp_path, xds_push=20)
    tgt.start()
    try:
        tgt.apply(MeshConfig(max_connections=7, http2_max_requests=11))
        t0 = time.monotonic()
        tgt.wait_ready(30)
        assert 0.3 <= time.monotonic() - t0 < 5
    finally:
        tgt.close()


def test_an_unreachable_sidecar_admin_is_a_preflight_error_saying_what_to_set(env: KubeEnv, tmp_path: Path) -> None:
    tgt = _target(env, tmp_path, sidecarAdminUrl="http://127.0.0.1:9")
    with pytest.raises(TargetError, match=r"target\.sidecarAdminUrl"):
        tgt.start()
    assert _target(env, tmp_path, sidecarAdminUrl="").sidecar_admin_url is None
    assert _target(env, tmp_path, sidecarAdminUrl=None, inCluster=True).sidecar_admin_url == "http://127.0.0.1:15000"
    assert _target(env, tmp_path, sidecarAdminUrl=None).sidecar_admin_url is None


def test_a_sidecar_request_above_its_limit_fails_the_rollout_as_the_replicaset_controller_reports_it(
        env: KubeEnv, tmp_path: Path) -> None:
    before = _baseline_state(env.cluster)
    tgt = _target(env, tmp_path)
    # Past spec validation (which refuses it), as a hand-edited template would be.
    tgt.sidecar = SidecarResources.model_construct(memory_request="2Gi", memory_limit="1Gi")
    tgt.start()
    try:
        tgt.apply(MeshConfig(cpu_limit=0.5))
        with pytest.raises(TrialFailed) as info:
            tgt.wait_ready(10)
        assert info.value.reason is FailReason.ROLLOUT_FAILED
        assert "must be less than or equal to memory limit of 1Gi" in str(info.value)
        tgt.restore()
        assert _baseline_state(env.cluster) == before
    finally:
        tgt.close()
    assert "cpu limit of 200m" in _pod_invalid("p", {"containers": [
        {"name": "istio-proxy", "resources": {"requests": {"cpu": "0.5"}, "limits": {"cpu": "200m"}}}]})
    assert _pod_invalid("p", {"containers": [
        {"name": "istio-proxy", "resources": {"requests": {"cpu": "200m"}, "limits": {"cpu": "0.2"}}}]}) == ""


def test_the_fake_enforces_the_destination_rule_crds_cel_rules(target: KubernetesTarget, fake: FakeCluster) -> None:
    import urllib.error
    import urllib.request

    def patch(body: dict[str, Any]) -> tuple[int, str]:
        req = urllib.request.Request(f"{fake.url}{DR_PATH}/{DR}", method="PATCH", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/merge-patch+json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    code, text = patch({"spec": {"trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "500us"}}}}})
    assert code == 422
    assert "spec.trafficPolicy.connectionPool.tcp.connectTimeout: Invalid value: \\\"500us\\\"" in text
    assert patch({"spec": {"trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "1ms"}}}}})[0] == 200
    # What autotune writes passes the same rules.
    target.apply(MeshConfig(max_connections=5, http2_max_requests=9, max_requests_per_connection=2))
    target.wait_ready(10)
