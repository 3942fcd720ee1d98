"""The one place that knows how a trial's settings become Istio objects and Envoy fields.

(a) What a user applies: a ``networking.istio.io/v1`` DestinationRule and the Deployment's
    pod-template annotations (``proxy.istio.io/config`` and the four ``sidecar.istio.io/proxy*``).
(b) What Istio 1.30 generates from them for the client sidecar's outbound cluster
    (``pilot/pkg/networking/core/cluster_traffic_policy.go``), used by the local target.
Source of truth: ``shared/reference/istio-mapping.md`` §1a–1c.
"""

from __future__ import annotations

from typing import Any

import yaml

from autotune.params import ISTIO_UNSET_LIMIT, MeshConfig
from autotune.quantity import format_cpu
from autotune.spec import ServiceRef, SidecarResources

#: Istio's mesh default ``connectTimeout`` (``pkg/config/mesh/mesh.go``), written on every cluster.
DEFAULT_CONNECT_TIMEOUT = "10s"
HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ANN_PROXY_CONFIG = "proxy.istio.io/config"
ANN_CPU = "sidecar.istio.io/proxyCPU"
ANN_CPU_LIMIT = "sidecar.istio.io/proxyCPULimit"
ANN_MEMORY = "sidecar.istio.io/proxyMemory"
ANN_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"


def cluster_name(service: ServiceRef) -> str:
    """Istio's outbound cluster name for the service, e.g. ``outbound|8080||backend.demo.svc.cluster.local``."""
    return f"outbound|{service.port}||{service.host}"


def connection_pool(config: MeshConfig) -> dict[str, Any]:
    """The DestinationRule ``trafficPolicy.connectionPool`` block; empty when nothing is set."""
    tcp: dict[str, Any] = {}
    http: dict[str, Any] = {}
    if config.max_connections is not None:
        tcp["maxConnections"] = config.max_connections
    if config.http1_max_pending_requests is not None:
        http["http1MaxPendingRequests"] = config.http1_max_pending_requests
    if config.http2_max_requests is not None:
        http["http2MaxRequests"] = config.http2_max_requests
    if config.max_requests_per_connection is not None:
        http["maxRequestsPerConnection"] = config.max_requests_per_connection
    if config.max_retries is not None:
        http["maxRetries"] = config.max_retries
    pool: dict[str, Any] = {}
    if tcp:
        pool["tcp"] = tcp
    if http:
        pool["http"] = http
    return pool


def destination_rule(config: MeshConfig, service: ServiceRef) -> dict[str, Any]:
    """The DestinationRule a user applies for this config (valid against the Istio 1.30 CRD)."""
    pool = connection_pool(config)
    spec: dict[str, Any] = {"host": service.host}
    if pool:
        spec["trafficPolicy"] = {"connectionPool": pool}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": service.destination_rule or service.name,
            "namespace": service.namespace,
            "labels": {"app.kubernetes.io/managed-by": "autotune"},
        },
        "spec": spec,
    }


def sidecar_annotations(config: MeshConfig, sidecar: SidecarResources) -> dict[str, str]:
    """Pod-template annotations for the sidecar. All four resource annotations are always written
    (Istio ignores its defaults as soon as one is present); the CPU request is capped at the limit
    because Kubernetes rejects a request above its limit. ``proxy.istio.io/config`` is only written
    when concurrency is set; otherwise pilot-agent derives it from the CPU limit."""
    limit = config.effective_cpu_limit
    annotations = {
        ANN_CPU: format_cpu(min(sidecar.cpu_request_cores, limit)),
        ANN_CPU_LIMIT: format_cpu(limit),
        ANN_MEMORY: sidecar.memory_request,
        ANN_MEMORY_LIMIT: sidecar.memory_limit,
    }
    if config.concurrency is not None:
        annotations[ANN_PROXY_CONFIG] = f"concurrency: {config.concurrency}"
    return annotations


def deployment_patch(config: MeshConfig, sidecar: SidecarResources) -> dict[str, Any]:
    """A merge patch for the Deployment (``kubectl patch deployment NAME --type merge --patch-file …``)."""
    return {"spec": {"template": {"metadata": {"annotations": sidecar_annotations(config, sidecar)}}}}


def envoy_cluster(config: MeshConfig, service: ServiceRef,
                  endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """The Envoy v3 ``Cluster`` Istio 1.30 emits for the client sidecar's outbound cluster,
    with STATIC endpoints standing in for EDS."""
    name = cluster_name(service)

    def limit(value: int | None) -> int:
        return value if value is not None else ISTIO_UNSET_LIMIT

    hpo: dict[str, Any] = {
        "@type": f"type.googleapis.com/{HPO_KEY}",
        "explicit_http_config": {"http_protocol_options": {}},  # h2UpgradePolicy DO_NOT_UPGRADE
    }
    if config.max_requests_per_connection is not None:
        hpo["common_http_protocol_options"] = {
            "max_requests_per_connection": config.max_requests_per_connection
        }
    return {
        "name": name,
        "alt_stat_name": f"{name};",
        "type": "STATIC",
        "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {
            "thresholds": [{
                "max_connections": limit(config.max_connections),
                "max_pending_requests": limit(config.http1_max_pending_requests),
                "max_requests": limit(config.http2_max_requests),
                "max_retries": limit(config.max_retries),
                "track_remaining": False,
            }]
        },
        "typed_extension_protocol_options": {HPO_KEY: hpo},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    for host, port in endpoints
                ]
            }],
        },
    }


def to_yaml(obj: dict[str, Any]) -> str:
    """Block-style YAML with keys in insertion order, as a user would write it."""
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
