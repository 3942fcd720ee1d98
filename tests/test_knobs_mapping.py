"""The resilience knobs (outlier detection, load balancer, timeouts, VirtualService retries, the
sidecar's CPU request and "no CPU limit") and Istio's route: what a user applies, validated
against the vendored Istio 1.30.3 CRDs (schema and CEL rules), and the Envoy fields Istio 1.30
generates from it (``cluster_traffic_policy.go``, ``route/retry/retry.go``; reference §1a, §1c, §1f).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import optuna
import pytest
import yaml

from _crd import DR_CRD, VS_CRD, load_crd, strict_dr_schema, strict_vs_schema
from _specs import small_spec, small_spec_data
from autotune import mesh
from autotune.errors import SpecError
from autotune.mesh import NO_LIMIT, PARAMETERS, MeshConfig
from autotune.spec import KubernetesTargetSpec, ServiceRef, SidecarResources, parse_spec
from autotune.study import suggest
from autotune.targets.kubernetes._target import KubernetesTarget
from autotune.targets.local._envoy import find_envoy_binary, render_bootstrap
from fake_k8s import _cel_errors

SERVICE = ServiceRef(name="backend", namespace="staging", port=8080)
SIDECAR = SidecarResources()
Cluster = dict[str, Any]


def _hpo(cluster: Cluster) -> dict[str, Any]:
    return dict(cluster["typed_extension_protocol_options"][mesh.HPO_KEY]["common_http_protocol_options"])


def _retry(config: MeshConfig) -> dict[str, Any]:
    return dict(mesh.envoy_route(config, SERVICE)["route"]["retry_policy"])


#: knob -> (value as from_params takes it, the Istio resource's block as written, where Envoy gets it).
Knob = tuple[Any, Callable[[dict[str, Any]], object], object, Callable[[MeshConfig], object], object]
KNOBS: dict[str, Knob] = {
    "connectionPool.http.idleTimeout": (
        250, lambda dr: dr["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"], "250ms",
        lambda c: _hpo(mesh.envoy_cluster(c, SERVICE, []))["idle_timeout"], "0.250s"),
    "connectionPool.tcp.connectTimeout": (
        1500, lambda dr: dr["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"], "1500ms",
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["connect_timeout"], "1.500s"),
    "outlierDetection.consecutive5xxErrors": (
        3, lambda dr: dr["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"], 3,
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["outlier_detection"],
        {"consecutive_5xx": 3, "enforcing_consecutive_5xx": 100, "enforcing_success_rate": 0}),
    "outlierDetection.consecutiveGatewayErrors": (
        4, lambda dr: dr["trafficPolicy"]["outlierDetection"]["consecutiveGatewayErrors"], 4,
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["outlier_detection"],
        {"consecutive_gateway_failure": 4, "enforcing_consecutive_gateway_failure": 100,
         "enforcing_success_rate": 0}),
    "outlierDetection.interval": (
        2000, lambda dr: dr["trafficPolicy"]["outlierDetection"]["interval"], "2s",
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["outlier_detection"],
        {"interval": "2s", "enforcing_success_rate": 0}),
    "outlierDetection.baseEjectionTime": (
        45000, lambda dr: dr["trafficPolicy"]["outlierDetection"]["baseEjectionTime"], "45s",
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["outlier_detection"],
        {"base_ejection_time": "45s", "enforcing_success_rate": 0}),
    "outlierDetection.maxEjectionPercent": (
        50, lambda dr: dr["trafficPolicy"]["outlierDetection"]["maxEjectionPercent"], 50,
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["outlier_detection"],
        {"max_ejection_percent": 50, "enforcing_success_rate": 0}),
    "loadBalancer.simple": (
        "ROUND_ROBIN", lambda dr: dr["trafficPolicy"]["loadBalancer"], {"simple": "ROUND_ROBIN"},
        lambda c: mesh.envoy_cluster(c, SERVICE, [])["lb_policy"], "ROUND_ROBIN"),
    "retries.attempts": (
        5, lambda vs: vs["http"][0]["retries"], {"attempts": 5},
        lambda c: _retry(c)["num_retries"], 5),
    "retries.perTryTimeout": (
        250, lambda vs: vs["http"][0]["retries"], {"attempts": 2, "perTryTimeout": "250ms"},
        lambda c: (_retry(c)["num_retries"], _retry(c)["per_try_timeout"]), (2, "0.250s")),
}
#: Covered by tests/test_mapping.py (connection-pool limits, concurrency, CPU limit) or below.
SEED = {"connectionPool.tcp.maxConnections", "connectionPool.http.http1MaxPendingRequests",
        "connectionPool.http.http2MaxRequests", "connectionPool.http.maxRequestsPerConnection",
        "connectionPool.http.maxRetries", "proxy.concurrency", "proxy.cpuLimit", "proxy.cpuRequest"}


def _validate(obj: dict[str, Any], crd_path: Path, schema: dict[str, Any]) -> None:
    """What the API server checks: served group/version/kind, metadata, the strict schema, CEL."""
    crd = load_crd(crd_path)
    group, version = obj["apiVersion"].split("/")
    assert group == crd["spec"]["group"] and obj["kind"] == crd["spec"]["names"]["kind"]
    assert any(v["name"] == version and v["served"] for v in crd["spec"]["versions"])
    assert set(obj["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    jsonschema.validate({"spec": obj["spec"]}, schema)
    assert _cel_errors(schema["properties"]["spec"], obj["spec"], "spec") == []
    assert yaml.safe_load(mesh.to_yaml(obj)) == obj


def _configs() -> list[MeshConfig]:
    out = [MeshConfig()]
    out += [MeshConfig.from_params({name: spec[0]}) for name, spec in KNOBS.items()]
    out += [MeshConfig(consecutive_5xx_errors=0, consecutive_gateway_errors=0), MeshConfig(retry_attempts=0),
            MeshConfig(idle_timeout_ms=1, connect_timeout_ms=86_400_000, lb_simple="RANDOM"),
            MeshConfig.from_params({name: spec[0] for name, spec in KNOBS.items()}
                                   | {"connectionPool.tcp.maxConnections": 10, "proxy.cpuLimit": NO_LIMIT})]
    return out


def test_vendored_virtualservice_crd_is_the_istio_1_30_3_file() -> None:
    assert hashlib.sha256(VS_CRD.read_bytes()).hexdigest() in (VS_CRD.parent / "SOURCE.txt").read_text()


def test_every_parameter_is_covered_by_a_mapping_test() -> None:
    assert set(KNOBS) | SEED == set(PARAMETERS)


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.describe())
def test_generated_destinationrule_and_virtualservice_are_valid_for_istio_1_30(config: MeshConfig) -> None:
    _validate(mesh.destination_rule(config, SERVICE), DR_CRD, strict_dr_schema("v1"))
    vs = mesh.virtual_service(config, SERVICE)
    assert (vs is not None) == (config.retry_attempts is not None or config.per_try_timeout_ms is not None)
    if vs is not None:
        _validate(vs, VS_CRD, strict_vs_schema("v1"))
        assert vs["spec"]["http"][0]["route"] == [
            {"destination": {"host": SERVICE.host, "port": {"number": 8080}}}]


def test_the_strict_schemas_reject_what_istio_rejects() -> None:
    vs = mesh.virtual_service(MeshConfig(retry_attempts=3, per_try_timeout_ms=100), SERVICE)
    assert vs is not None
    bad = json.loads(json.dumps(vs))
    bad["spec"]["http"][0]["retries"]["attempt"] = 3  # misspelled
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": bad["spec"]}, strict_vs_schema())
    bad = json.loads(json.dumps(vs))
    bad["spec"]["http"][0]["retries"]["perTryTimeout"] = "0s"  # CEL: >= 1ms
    assert _cel_errors(strict_vs_schema()["properties"]["spec"], bad["spec"], "spec")
    dr = mesh.destination_rule(MeshConfig(lb_simple="RANDOM"), SERVICE)
    dr["spec"]["trafficPolicy"]["loadBalancer"]["simple"] = "FASTEST"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": dr["spec"]}, strict_dr_schema())


@pytest.mark.parametrize("name", list(KNOBS))
def test_each_knob_reaches_its_istio_and_envoy_field(name: str) -> None:
    value, istio_at, istio_value, envoy_at, envoy_value = KNOBS[name]
    config = MeshConfig.from_params({name: value})
    resource = (mesh.virtual_service(config, SERVICE) if PARAMETERS[name].resource == "virtualservice"
                else mesh.destination_rule(config, SERVICE))
    assert resource is not None
    assert istio_at(resource["spec"]) == istio_value
    assert envoy_at(config) == envoy_value
    # The config survives the trial record (Istio-named params) unchanged.
    assert MeshConfig.from_params(config.to_params()) == config


def test_left_out_knobs_write_nothing_and_the_route_carries_istios_default_retry_policy() -> None:
    config = MeshConfig()
    cluster = mesh.envoy_cluster(config, SERVICE, [("127.0.0.1", 1)])
    for key in ("outlier_detection", "common_lb_config", "typed_extension_protocol_options"):
        assert key not in cluster
    assert cluster["lb_policy"] == "LEAST_REQUEST" and cluster["connect_timeout"] == "10s"
    assert mesh.virtual_service(config, SERVICE) is None
    assert "trafficPolicy" not in mesh.destination_rule(config, SERVICE)["spec"]
    route = mesh.envoy_route(config, SERVICE)
    assert route == {"match": {"prefix": "/"}, "route": {
        "cluster": "outbound|8080||backend.staging.svc.cluster.local", "timeout": "0s",
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            "num_retries": 2,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                          "previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 5}}}
    # Istio 1.30 (EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY=true): a 503 response is not retried.
    assert "retriable_status_codes" not in route["route"]["retry_policy"]


def test_any_outlier_setting_creates_the_block_and_turns_panic_mode_off() -> None:
    cluster = mesh.envoy_cluster(MeshConfig(max_ejection_percent=100), SERVICE, [])
    assert cluster["outlier_detection"] == {"enforcing_success_rate": 0, "max_ejection_percent": 100}
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}
    off = mesh.envoy_cluster(MeshConfig(consecutive_5xx_errors=0, consecutive_gateway_errors=0), SERVICE, [])
    assert off["outlier_detection"] == {
        "enforcing_success_rate": 0, "consecutive_5xx": 0, "enforcing_consecutive_5xx": 0,
        "consecutive_gateway_failure": 0, "enforcing_consecutive_gateway_failure": 0}


def test_idle_timeout_shares_the_protocol_options_with_max_requests_per_connection() -> None:
    cluster = mesh.envoy_cluster(MeshConfig(idle_timeout_ms=60_000, max_requests_per_connection=9), SERVICE, [])
    hpo = cluster["typed_extension_protocol_options"][mesh.HPO_KEY]
    assert hpo["common_http_protocol_options"] == {"idle_timeout": "60s", "max_requests_per_connection": 9}
    assert hpo["explicit_http_config"] == {"http_protocol_options": {}}


def test_zero_attempts_removes_the_retry_policy() -> None:
    config = MeshConfig(retry_attempts=0)
    assert "retry_policy" not in mesh.envoy_route(config, SERVICE)["route"]
    vs = mesh.virtual_service(config, SERVICE)
    assert vs is not None and vs["spec"]["http"][0]["retries"] == {"attempts": 0}


def test_cpu_request_and_no_cpu_limit_annotations() -> None:
    ann = mesh.sidecar_annotations(MeshConfig(cpu_request=0.25, cpu_limit=0.2), SIDECAR)
    assert ann[mesh.ANN_CPU] == "200m" and ann[mesh.ANN_CPU_LIMIT] == "200m"  # capped at the limit
    unlimited = MeshConfig(cpu_request=0.3, no_cpu_limit=True)
    ann = mesh.sidecar_annotations(unlimited, SIDECAR)
    assert ann[mesh.ANN_CPU] == "300m" and mesh.ANN_CPU_LIMIT not in ann
    assert ann[mesh.ANN_MEMORY] == "128Mi" and ann[mesh.ANN_MEMORY_LIMIT] == "1024Mi"
    # No limit: the downward API reports the node's CPUs, so pilot-agent runs one worker per CPU.
    assert unlimited.limit_cores is None
    assert unlimited.effective_concurrency == (os.cpu_count() or 1)
    assert unlimited.to_params() == {"proxy.cpuRequest": 0.3, "proxy.cpuLimit": "unset"}
    assert MeshConfig.from_params(unlimited.to_params()) == unlimited
    with pytest.raises(ValueError, match="contradict"):
        MeshConfig(cpu_limit=1.0, no_cpu_limit=True)


# -- the spec and the sampler ------------------------------------------------------------------

def _spec_with(tmp_path: Path, parameters: dict[str, Any]) -> Any:
    data = small_spec_data(tmp_path)
    data["parameters"] = parameters
    return parse_spec(data, "spec.yaml")


def test_spec_reads_choices_durations_and_an_unset_cpu_limit(tmp_path: Path) -> None:
    spec = _spec_with(tmp_path, {
        "loadBalancer.simple": {"choices": ["LEAST_REQUEST", "RANDOM"]},
        "connectionPool.tcp.connectTimeout": {"low": "250ms", "high": "2s", "log": True},
        "proxy.cpuLimit": {"low": "200m", "high": "1", "unset": True},
    })
    by_name = {p.name: p for p in spec.search_space()}
    assert by_name["loadBalancer.simple"].choices == ("LEAST_REQUEST", "RANDOM")
    assert (by_name["connectionPool.tcp.connectTimeout"].low, by_name["connectionPool.tcp.connectTimeout"].high) \
        == (250, 2000)
    assert by_name["proxy.cpuLimit"].unset


@pytest.mark.parametrize("parameters,message", [
    ({"loadBalancer.simple": {"choices": ["FASTEST"]}}, "must be one of LEAST_REQUEST, ROUND_ROBIN, RANDOM"),
    ({"loadBalancer.simple": {"low": 1, "high": 2}}, "give choices"),
    ({"connectionPool.tcp.connectTimeout": {"low": 250, "high": "1s"}}, "written with its unit"),
    ({"connectionPool.tcp.connectTimeout": {"low": "0.5ms", "high": "1s"}}, "whole milliseconds"),
    ({"outlierDetection.maxEjectionPercent": {"low": 10, "high": 101}}, "must be <= 100"),
    ({"proxy.concurrency": {"low": 1, "high": 2, "unset": True}}, "only proxy.cpuLimit can be left unset"),
    ({"proxy.cpuRequest": {"low": "100m", "high": "600m"}, "proxy.cpuLimit": {"low": "500m", "high": "1"}},
     'parameters["proxy.cpuRequest"].high: must be <= the lowest proxy.cpuLimit searched (500m)'),
])
def test_spec_refuses_bad_knob_ranges_with_the_rule(tmp_path: Path, parameters: dict[str, Any],
                                                    message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        _spec_with(tmp_path, parameters)


def test_sampler_suggests_categorical_values_and_no_limit(tmp_path: Path) -> None:
    spec = _spec_with(tmp_path, {
        "loadBalancer.simple": {"choices": ["ROUND_ROBIN", "RANDOM"]},
        "retries.perTryTimeout": {"low": "10ms", "high": "1s"},
        "proxy.cpuLimit": {"low": "200m", "high": "1", "unset": True},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = []
    for _ in range(30):
        config = suggest(study.ask(), spec.search_space())
        assert config.lb_simple in ("ROUND_ROBIN", "RANDOM")
        assert config.per_try_timeout_ms is not None and 10 <= config.per_try_timeout_ms <= 1000
        seen.append(config.no_cpu_limit)
        assert config.no_cpu_limit or 0.2 <= (config.cpu_limit or 0) <= 1
    assert any(seen) and not all(seen)


def test_kubernetes_target_accepts_every_knob(tmp_path: Path) -> None:
    """Every parameter has a place on Kubernetes (DestinationRule, VirtualService, pod template;
    tests/test_kubernetes_faults.py applies them to the fake cluster)."""
    spec = _spec_with(tmp_path, {"outlierDetection.interval": {"low": "1s", "high": "10s"},
                                 "retries.attempts": {"low": 0, "high": 5},
                                 "proxy.cpuRequest": {"low": "50m", "high": "100m"},
                                 "proxy.cpuLimit": {"low": "200m", "high": "1", "unset": True},
                                 "connectionPool.tcp.maxConnections": {"low": 1, "high": 10}})
    k8s = KubernetesTargetSpec.model_validate({
        "kind": "kubernetes", "namespace": "staging", "deployment": "d", "destinationRule": "r",
        "host": "h", "serviceUrl": "http://h", "prometheus": {"url": "http://p"}})
    target = KubernetesTarget(k8s, SERVICE, SIDECAR)
    target.check_supported(spec.search_space())
    assert {p.name for p in spec.search_space()} <= set(mesh.PARAMETERS)


# -- the real Envoy accepts what the local target renders ----------------------------------------

def test_envoy_validates_bootstraps_with_the_new_knobs(tmp_path: Path) -> None:
    binary = find_envoy_binary(small_spec(tmp_path).target.envoy_binary)  # type: ignore[union-attr]
    for i, config in enumerate(_configs()):
        bootstrap = render_bootstrap(mesh.envoy_cluster(config, SERVICE, [("127.0.0.1", 18080)]), 0,
                                     mesh.envoy_route(config, SERVICE))
        path = tmp_path / f"bootstrap-{i}.json"
        path.write_text(json.dumps(bootstrap))
        done = subprocess.run([binary, "--mode", "validate", "-c", str(path), "--log-level", "error"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{config.describe()}: {done.stdout[-800:]} {done.stderr[-800:]}"
    # Without a route, the bootstrap carries Istio's default one.
    default = render_bootstrap(mesh.envoy_cluster(MeshConfig(), SERVICE, []))
    hcm = default["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["route_config"]["virtual_hosts"][0]["routes"] == [mesh.envoy_route(MeshConfig(), SERVICE)]


# -- the cost axis ---------------------------------------------------------------------------

def test_cost_metrics_are_named_for_what_they_are() -> None:
    from autotune.study._cost import cost_metrics

    m = cost_metrics(MeshConfig(cpu_limit=0.5), cpu_used=0.06, achieved_rps=300.0, request_default=0.1)
    assert m == pytest.approx({"cpu_used_cores": 0.06, "cpu_requested_cores": 0.1,
                               "cpu_limit_cores": 0.5, "cpu_per_1k_rps": 0.2})
    # The request is what the annotation says: the searched one, capped at the limit.
    assert cost_metrics(MeshConfig(cpu_request=0.8, cpu_limit=0.5), 0.1, 100, 0.1)["cpu_requested_cores"] == 0.5
    assert cost_metrics(MeshConfig(cpu_request=0.8, no_cpu_limit=True), 0.1, 100, 0.1)["cpu_requested_cores"] == 0.8
    assert math.isnan(cost_metrics(MeshConfig(), 0.1, 0.0, 0.1)["cpu_per_1k_rps"])  # nothing served


def test_old_cost_names_are_accepted_with_a_deprecation_message(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    data = small_spec_data(tmp_path)
    data["objectives"] = ["latency_p95_ms", "cpu_reserved_cores"]
    with caplog.at_level("WARNING", logger="autotune.spec._models"):
        spec = parse_spec(data, "spec.yaml")
    assert [o.metric for o in spec.objectives] == ["latency_p95_ms", "cpu_reserved_cores"]
    assert "cpu_reserved_cores is deprecated" in caplog.text and "cpu_limit_cores" in caplog.text
    caplog.clear()
    data["objectives"] = ["latency_p95_ms", "cpu_requested_cores", "cpu_per_1k_rps"]
    with caplog.at_level("WARNING", logger="autotune.spec._models"):
        parse_spec(data, "spec.yaml")
    assert "deprecated" not in caplog.text


def test_the_running_local_envoy_holds_istios_route_and_the_new_cluster_fields() -> None:
    """On the real local target: the default route's retry policy, then a config with the new
    knobs, as Envoy's admin reports them (the running config, not what was rendered)."""
    from autotune.spec import LocalTargetSpec, UpstreamSpec
    from autotune.targets.local import LocalTarget

    target = LocalTarget(LocalTargetSpec(upstream=UpstreamSpec(endpoints=2, service_time_ms=0)), SERVICE)
    target.start()
    try:
        def running() -> tuple[dict[str, Any], dict[str, Any]]:
            assert target.envoy is not None
            dump = json.loads(target.envoy.admin_get("/config_dump?resource=static_listeners"))
            (listener,) = dump["configs"]
            hcm = listener["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
            (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
            return route["route"], target.envoy.cluster_config(mesh.cluster_name(SERVICE))

        action, cluster = running()
        assert action["retry_policy"]["num_retries"] == 2
        assert action["retry_policy"]["retry_on"] == mesh.DEFAULT_RETRY_ON
        assert action["retry_policy"]["retry_host_predicate"][0]["name"] == mesh.PREVIOUS_HOSTS
        assert "outlier_detection" not in cluster and cluster["lb_policy"] == "LEAST_REQUEST"

        config = MeshConfig(retry_attempts=4, per_try_timeout_ms=250, consecutive_5xx_errors=3,
                            max_ejection_percent=50, lb_simple="ROUND_ROBIN", connect_timeout_ms=750,
                            idle_timeout_ms=30_000, no_cpu_limit=True)
        target.apply(config)
        target.wait_ready(30)
        action, cluster = running()
        assert action["retry_policy"]["num_retries"] == 4 and action["retry_policy"]["per_try_timeout"] == "0.250s"
        assert cluster.get("lb_policy", "ROUND_ROBIN") == "ROUND_ROBIN"  # the enum's 0: JSON omits it
        assert cluster["connect_timeout"] == "0.750s"
        assert cluster["outlier_detection"]["consecutive_5xx"] == 3
        assert cluster["outlier_detection"]["max_ejection_percent"] == 50
        assert cluster["common_lb_config"]["healthy_panic_threshold"] == {}  # 0 %: proto3 JSON omits it
    finally:
        target.close()
