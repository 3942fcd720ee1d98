"""What Istio 1.30 generates from a config for the client sidecar's outbound cluster
(``pilot/pkg/networking/core/cluster_traffic_policy.go``) and its route to it
(``pilot/pkg/networking/core/route/retry/retry.go``), used by the local target.
Source of truth: ``shared/reference/istio-mapping.md`` §1a–1c, §1f.
"""

from __future__ import annotations

from typing import Any

from autotune.mesh._istio import DEFAULT_RETRY_ATTEMPTS
from autotune.mesh._service import ServiceRef
from autotune.mesh._settings import ISTIO_UNSET_LIMIT, MeshConfig

#: Istio's mesh default ``connectTimeout`` (``pkg/config/mesh/mesh.go``), written on every cluster.
DEFAULT_CONNECT_TIMEOUT = "10s"
HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
#: ``retry_on`` of Istio 1.30's default route retry policy. With EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY
#: (default true) it sets no ``retriable_status_codes``, so a 503 response is not retried.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
_PREVIOUS_HOSTS_TYPE = ("type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                        "PreviousHostsPredicate")


def envoy_duration(ms: int) -> str:
    """A duration as protobuf JSON writes it (what Istio's config dump shows): ``"10s"``,
    ``"0.250s"``."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.3f}s"


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
    common: dict[str, Any] = {}
    if config.idle_timeout_ms is not None:
        common["idle_timeout"] = envoy_duration(config.idle_timeout_ms)
    if config.max_requests_per_connection is not None:
        common["max_requests_per_connection"] = config.max_requests_per_connection
    if common:
        protocol_options[HPO_KEY] = {
            "@type": f"type.googleapis.com/{HPO_KEY}",
            "common_http_protocol_options": common,
            "explicit_http_config": {"http_protocol_options": {}},  # h2UpgradePolicy DO_NOT_UPGRADE
        }
    connect = (envoy_duration(config.connect_timeout_ms) if config.connect_timeout_ms is not None
               else DEFAULT_CONNECT_TIMEOUT)
    cluster: dict[str, Any] = {
        "name": name,
        "alt_stat_name": f"{name};",
        "type": "STATIC",
        "connect_timeout": connect,
        # applyLoadBalancer: unset (and LEAST_CONN) is LEAST_REQUEST, no lb config without warmup.
        "lb_policy": config.lb_simple or "LEAST_REQUEST",
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
    outlier = envoy_outlier_detection(config)
    if outlier is not None:
        cluster["outlier_detection"] = outlier
        # minHealthPercent unset (0) is written as a panic threshold of 0 whenever the block exists.
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return cluster


def envoy_outlier_detection(config: MeshConfig) -> dict[str, Any] | None:
    """``applyOutlierDetection``: ``None`` without an ``outlierDetection`` block, else the
    cluster's ``outlier_detection`` (success-rate ejection off; a consecutive-error count of 0
    disables its check with enforcing 0, any other count enforces at 100 %)."""
    fields = (config.consecutive_5xx_errors, config.consecutive_gateway_errors,
              config.outlier_interval_ms, config.base_ejection_time_ms, config.max_ejection_percent)
    if all(f is None for f in fields):
        return None
    out: dict[str, Any] = {"enforcing_success_rate": 0}
    if config.consecutive_5xx_errors is not None:
        out["consecutive_5xx"] = config.consecutive_5xx_errors
        out["enforcing_consecutive_5xx"] = 100 if config.consecutive_5xx_errors > 0 else 0
    if config.consecutive_gateway_errors is not None:
        out["consecutive_gateway_failure"] = config.consecutive_gateway_errors
        out["enforcing_consecutive_gateway_failure"] = 100 if config.consecutive_gateway_errors > 0 else 0
    if config.outlier_interval_ms is not None:
        out["interval"] = envoy_duration(config.outlier_interval_ms)
    if config.base_ejection_time_ms is not None:
        out["base_ejection_time"] = envoy_duration(config.base_ejection_time_ms)
    if config.max_ejection_percent is not None:
        out["max_ejection_percent"] = config.max_ejection_percent
    return out


def envoy_retry_policy(config: MeshConfig) -> dict[str, Any] | None:
    """The route's ``retry_policy`` (``retry.ConvertPolicy``): Istio's default (2 retries on
    connect-failure, refused-stream, unavailable, cancelled; 5 host selection attempts; the
    previous-hosts predicate), with ``retries.attempts`` / ``perTryTimeout`` when tuned;
    ``None`` with ``attempts: 0`` (Istio then writes no retry policy)."""
    if config.retry_attempts == 0:
        return None
    attempts = config.retry_attempts if config.retry_attempts is not None else DEFAULT_RETRY_ATTEMPTS
    policy: dict[str, Any] = {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": attempts,
        "retry_host_predicate": [{"name": PREVIOUS_HOSTS,
                                  "typed_config": {"@type": _PREVIOUS_HOSTS_TYPE}}],
        "host_selection_retry_max_attempts": 5,
    }
    if config.per_try_timeout_ms is not None:
        policy["per_try_timeout"] = envoy_duration(config.per_try_timeout_ms)
    return policy


def envoy_route(config: MeshConfig, service: ServiceRef) -> dict[str, Any]:
    """The outbound HTTP route Istio 1.30 writes to the service's cluster: every path, route
    timeout ``0s`` (disabled, no VirtualService ``timeout``), and the retry policy of
    ``envoy_retry_policy`` when there is one."""
    action: dict[str, Any] = {"cluster": cluster_name(service), "timeout": "0s"}
    policy = envoy_retry_policy(config)
    if policy is not None:
        action["retry_policy"] = policy
    return {"match": {"prefix": "/"}, "route": action}
