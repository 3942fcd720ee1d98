"""What Istio 1.30 generates from a config for the client sidecar's outbound cluster
(``pilot/pkg/networking/core/cluster_traffic_policy.go``), used by the local target.
Source of truth: ``shared/reference/istio-mapping.md`` §1a–1c.
"""

from __future__ import annotations

from typing import Any

from autotune.mesh._service import ServiceRef
from autotune.mesh._settings import ISTIO_UNSET_LIMIT, MeshConfig

#: Istio's mesh default ``connectTimeout`` (``pkg/config/mesh/mesh.go``), written on every cluster.
DEFAULT_CONNECT_TIMEOUT = "10s"
HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster_name(service: ServiceRef) -> str:
    """Istio's outbound cluster name for the service, e.g. ``outbound|8080||backend.demo.svc.cluster.local``."""
    return f"outbound|{service.port}||{service.host}"


def envoy_cluster(config: MeshConfig, service: ServiceRef,
                  endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """The Envoy v3 ``Cluster`` Istio 1.30 emits for the client sidecar's outbound cluster,
    with STATIC endpoints standing in for EDS."""
    name = cluster_name(service)

    def limit(value: int | None) -> int:
        return value if value is not None else ISTIO_UNSET_LIMIT

    # Istio writes HttpProtocolOptions only when a setting needs them (``clusterWrapper.build()``
    # in cluster_builder.go; upstream TestBuildDefaultCluster expects none for a default cluster).
    protocol_options: dict[str, Any] = {}
    if config.max_requests_per_connection is not None:
        protocol_options[HPO_KEY] = {
            "@type": f"type.googleapis.com/{HPO_KEY}",
            "common_http_protocol_options": {
                "max_requests_per_connection": config.max_requests_per_connection
            },
            "explicit_http_config": {"http_protocol_options": {}},  # h2UpgradePolicy DO_NOT_UPGRADE
        }
    cluster: dict[str, Any] = {
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
    if protocol_options:
        cluster["typed_extension_protocol_options"] = protocol_options
    return cluster
