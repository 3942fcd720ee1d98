"""The Istio translation: manifests a user applies and the Envoy fields Istio generates from them.

Facts checked against shared/reference/istio-mapping.md §1a–1c; every generated DestinationRule is
validated against the real Istio 1.30.3 CRD schema (vendored in tests/data/istio-crds).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from _crd import DR_CRD, load_crd, strict_dr_schema
from autotune import mesh as mapping
from autotune.mesh import ISTIO_UNSET_LIMIT, PARAMETERS, MeshConfig
from autotune.spec import ServiceRef, SidecarResources

CRD = DR_CRD
SERVICE = ServiceRef(name="backend", namespace="staging", port=8080)
SIDECAR = SidecarResources()


@pytest.fixture(scope="module")
def dr_schema() -> dict[str, Any]:
    (v1,) = [v for v in load_crd()["spec"]["versions"] if v["name"] == "v1"]
    assert v1["storage"] is True
    return strict_dr_schema("v1")


def _validate(dr: dict[str, Any], schema: dict[str, Any]) -> None:
    """What the API server checks: a served group/version/kind, a DNS-1123 name, the spec schema."""
    crd = load_crd()
    group, version = dr["apiVersion"].split("/")
    assert group == crd["spec"]["group"] and dr["kind"] == crd["spec"]["names"]["kind"]
    assert any(v["name"] == version and v["served"] for v in crd["spec"]["versions"])
    assert set(dr["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    jsonschema.validate({"spec": dr["spec"]}, schema)


def _configs() -> list[MeshConfig]:
    values = {
        "connectionPool.tcp.maxConnections": [1, 100, 2**31 - 1],
        "connectionPool.http.http1MaxPendingRequests": [1, 50],
        "connectionPool.http.http2MaxRequests": [1, 200],
        "connectionPool.http.maxRequestsPerConnection": [1, 2**29],
        "connectionPool.http.maxRetries": [3],
        "proxy.concurrency": [1, 4],
        "proxy.cpuLimit": [0.01, 0.5, 2.5],
    }
    out = [MeshConfig()]
    for name, options in values.items():
        out += [MeshConfig.from_params({name: v}) for v in options]
    out.append(MeshConfig.from_params({k: v[-1] for k, v in values.items()}))
    return out


def test_vendored_crd_is_the_istio_1_30_3_file() -> None:
    digest = hashlib.sha256(CRD.read_bytes()).hexdigest()
    assert digest in (CRD.parent / "SOURCE.txt").read_text()


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.describe())
def test_every_generated_destinationrule_is_valid_for_istio_1_30(
    config: MeshConfig, dr_schema: dict[str, Any]
) -> None:
    dr = mapping.destination_rule(config, SERVICE)
    # The YAML a user applies round-trips to the same object.
    assert yaml.safe_load(mapping.to_yaml(dr)) == dr
    _validate(dr, dr_schema)
    # What the schema does not check (SOURCE.txt): int32 bounds, and istiod's "> 0" rule.
    pool = dr["spec"].get("trafficPolicy", {}).get("connectionPool", {})
    for block in pool.values():
        for value in block.values():
            assert 1 <= value <= 2**31 - 1


def test_schema_rejects_what_istio_rejects(dr_schema: dict[str, Any]) -> None:
    dr = mapping.destination_rule(MeshConfig(max_connections=5), SERVICE)
    bad = copy.deepcopy(dr)
    bad["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnection"] = 5  # misspelled
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, dr_schema)
    bad = copy.deepcopy(dr)
    bad["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] = "5"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, dr_schema)


def test_left_out_settings_are_not_written_and_envoy_gets_istio_defaults() -> None:
    config = MeshConfig()
    assert "trafficPolicy" not in mapping.destination_rule(config, SERVICE)["spec"]
    cluster = mapping.envoy_cluster(config, SERVICE, [("127.0.0.1", 18080)])
    (th,) = cluster["circuit_breakers"]["thresholds"]
    assert th == {"max_connections": ISTIO_UNSET_LIMIT, "max_pending_requests": ISTIO_UNSET_LIMIT,
                  "max_requests": ISTIO_UNSET_LIMIT, "max_retries": ISTIO_UNSET_LIMIT,
                  "track_remaining": False}
    # As Istio: no HttpProtocolOptions unless a setting needs them (TestBuildDefaultCluster).
    assert "typed_extension_protocol_options" not in cluster
    assert cluster["connect_timeout"] == "10s"  # meshConfig.connectTimeout default
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    # Istio 1.30: concurrency unset -> ceil(CPU limit), default limit 2000m -> 2 workers.
    assert config.effective_concurrency == 2


def test_envoy_cluster_matches_the_reference_standin_for_the_sample_rule() -> None:
    """The reference bootstrap carries what Istio emits for maxConnections 100, pending 50,
    http2MaxRequests 200, maxRequestsPerConnection 100, maxRetries 3."""
    ref = yaml.safe_load(
        (Path(__file__).parent / "data" / "envoy-standin-bootstrap.yaml").read_text()
    )["static_resources"]["clusters"][0]
    config = MeshConfig(max_connections=100, http1_max_pending_requests=50, http2_max_requests=200,
                        max_requests_per_connection=100, max_retries=3)
    ours = mapping.envoy_cluster(config, ServiceRef(name="backend", namespace="demo"),
                                 [("127.0.0.1", 18080), ("127.0.0.1", 18081)])
    assert ours["name"] == ref["name"] and ours["alt_stat_name"] == ref["alt_stat_name"]
    assert ours["circuit_breakers"] == ref["circuit_breakers"]
    assert ours["lb_policy"] == ref["lb_policy"]
    assert ours["load_assignment"] == ref["load_assignment"]
    ref_hpo = ref["typed_extension_protocol_options"][mapping.HPO_KEY]
    our_hpo = ours["typed_extension_protocol_options"][mapping.HPO_KEY]
    assert our_hpo["@type"] == ref_hpo["@type"]
    assert (our_hpo["common_http_protocol_options"]["max_requests_per_connection"]
            == ref_hpo["common_http_protocol_options"]["max_requests_per_connection"])


@pytest.mark.parametrize("config", [MeshConfig(max_connections=5), MeshConfig(max_retries=3, concurrency=1),
                                    MeshConfig(cpu_limit=0.5)])
def test_protocol_options_only_when_a_setting_needs_them(config: MeshConfig) -> None:
    """Circuit-breaker-only and sidecar-only configs carry no HttpProtocolOptions, like Istio's
    cluster builder; maxRequestsPerConnection brings them with the HTTP/1.1 explicit config."""
    cluster = mapping.envoy_cluster(config, SERVICE, [("127.0.0.1", 1)])
    assert "typed_extension_protocol_options" not in cluster
    with_mrpc = mapping.envoy_cluster(MeshConfig(max_requests_per_connection=9), SERVICE, [("127.0.0.1", 1)])
    hpo = with_mrpc["typed_extension_protocol_options"][mapping.HPO_KEY]
    assert hpo["common_http_protocol_options"] == {"max_requests_per_connection": 9}
    assert hpo["explicit_http_config"] == {"http_protocol_options": {}}  # DO_NOT_UPGRADE


@pytest.mark.parametrize("limit,request_,concurrency", [(0.5, "100m", None), (0.05, "50m", 1),
                                                       (2.5, "100m", None)])
def test_deployment_patch_always_writes_all_four_resource_annotations(
    limit: float, request_: str, concurrency: int | None
) -> None:
    config = MeshConfig(cpu_limit=limit, concurrency=concurrency)
    ann = mapping.deployment_patch(config, SIDECAR)["spec"]["template"]["metadata"]["annotations"]
    assert ann[mapping.ANN_CPU] == request_  # request capped at the limit (K8s rejects req > lim)
    assert ann[mapping.ANN_CPU_LIMIT] == {0.5: "500m", 0.05: "50m", 2.5: "2500m"}[limit]
    assert ann[mapping.ANN_MEMORY] == "128Mi" and ann[mapping.ANN_MEMORY_LIMIT] == "1024Mi"
    if concurrency is None:
        assert mapping.ANN_PROXY_CONFIG not in ann
        # pilot-agent derives concurrency from the limit, rounded up (2500m -> 3 workers).
        assert config.effective_concurrency == max(1, -(-int(limit * 1000) // 1000))
    else:
        assert yaml.safe_load(ann[mapping.ANN_PROXY_CONFIG]) == {"concurrency": concurrency}


def test_every_seed_parameter_reaches_a_manifest_and_envoy() -> None:
    """The connection-pool limits and the sidecar's concurrency and CPU limit are not dropped by
    the translation (the other knobs: tests/test_knobs_mapping.py, which covers the registry)."""
    seed = ("connectionPool.tcp.maxConnections", "connectionPool.http.http1MaxPendingRequests",
            "connectionPool.http.http2MaxRequests", "connectionPool.http.maxRequestsPerConnection",
            "connectionPool.http.maxRetries", "proxy.concurrency", "proxy.cpuLimit")
    for name in seed:
        value = 0.25 if PARAMETERS[name].kind == "cpu" else 7
        config = MeshConfig.from_params({name: value})
        dr = mapping.to_yaml(mapping.destination_rule(config, SERVICE))
        patch = mapping.to_yaml(mapping.deployment_patch(config, SIDECAR))
        cluster = mapping.envoy_cluster(config, SERVICE, [("127.0.0.1", 1)])
        field = name.rsplit(".", 1)[-1]
        if name.startswith("connectionPool."):
            assert f"{field}: 7" in dr
            assert 7 in list(itertools.chain(
                cluster["circuit_breakers"]["thresholds"][0].values(),
                cluster.get("typed_extension_protocol_options", {}).get(mapping.HPO_KEY, {})
                .get("common_http_protocol_options", {}).values()))
        elif field == "concurrency":
            assert "concurrency: 7" in patch
        else:
            assert "proxyCPULimit: 250m" in patch
