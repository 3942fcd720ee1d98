"""What a user applies for a config: a ``networking.istio.io/v1`` DestinationRule, a
VirtualService when a route setting is tuned, and the Deployment's pod-template annotations
(``proxy.istio.io/config`` and the ``sidecar.istio.io/proxy*`` ones).
Source of truth: ``shared/reference/istio-mapping.md`` §1a–1c, §1f.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from autotune.mesh._quantity import format_cpu
from autotune.mesh._service import ServiceRef, SidecarResources
from autotune.mesh._settings import MeshConfig

ANN_PROXY_CONFIG = "proxy.istio.io/config"
ANN_CPU = "sidecar.istio.io/proxyCPU"
ANN_CPU_LIMIT = "sidecar.istio.io/proxyCPULimit"
ANN_MEMORY = "sidecar.istio.io/proxyMemory"
ANN_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"
#: ``num_retries`` of Istio's default route retry policy (``route/retry/retry.go``).
DEFAULT_RETRY_ATTEMPTS = 2


def istio_duration(ms: int) -> str:
    """A duration as a user writes it in an Istio resource: ``"10s"``, ``"250ms"`` (whole ms, as
    istiod requires)."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def connection_pool(config: MeshConfig) -> dict[str, dict[str, int | str]]:
    """The DestinationRule ``trafficPolicy.connectionPool`` block (``tcp`` and ``http``, each
    only with the fields set); empty when nothing is set."""
    tcp: dict[str, int | str] = {}
    http: dict[str, int | str] = {}
    if config.max_connections is not None:
        tcp["maxConnections"] = config.max_connections
    if config.connect_timeout_ms is not None:
        tcp["connectTimeout"] = istio_duration(config.connect_timeout_ms)
    if config.http1_max_pending_requests is not None:
        http["http1MaxPendingRequests"] = config.http1_max_pending_requests
    if config.http2_max_requests is not None:
        http["http2MaxRequests"] = config.http2_max_requests
    if config.max_requests_per_connection is not None:
        http["maxRequestsPerConnection"] = config.max_requests_per_connection
    if config.max_retries is not None:
        http["maxRetries"] = config.max_retries
    if config.idle_timeout_ms is not None:
        http["idleTimeout"] = istio_duration(config.idle_timeout_ms)
    pool: dict[str, dict[str, int | str]] = {}
    if tcp:
        pool["tcp"] = tcp
    if http:
        pool["http"] = http
    return pool


def outlier_detection(config: MeshConfig) -> dict[str, int | str]:
    """The DestinationRule ``trafficPolicy.outlierDetection`` block; empty when none of its
    settings is set (then Istio writes no outlier detection at all)."""
    out: dict[str, int | str] = {}
    if config.consecutive_5xx_errors is not None:
        out["consecutive5xxErrors"] = config.consecutive_5xx_errors
    if config.consecutive_gateway_errors is not None:
        out["consecutiveGatewayErrors"] = config.consecutive_gateway_errors
    if config.outlier_interval_ms is not None:
        out["interval"] = istio_duration(config.outlier_interval_ms)
    if config.base_ejection_time_ms is not None:
        out["baseEjectionTime"] = istio_duration(config.base_ejection_time_ms)
    if config.max_ejection_percent is not None:
        out["maxEjectionPercent"] = config.max_ejection_percent
    return out


def traffic_policy(config: MeshConfig) -> dict[str, Any]:
    """The DestinationRule ``trafficPolicy`` (only the blocks with a setting); may be empty."""
    policy: dict[str, Any] = {}
    pool = connection_pool(config)
    if pool:
        policy["connectionPool"] = pool
    outlier = outlier_detection(config)
    if outlier:
        policy["outlierDetection"] = outlier
    if config.lb_simple is not None:
        policy["loadBalancer"] = {"simple": config.lb_simple}
    return policy


def destination_rule(config: MeshConfig, service: ServiceRef) -> dict[str, Any]:
    """The DestinationRule a user applies for this config (valid against the Istio 1.30 CRD), as
    the mutable JSON body the Kubernetes client sends."""
    policy = traffic_policy(config)
    spec: dict[str, object] = {"host": service.host}
    if policy:
        spec["trafficPolicy"] = policy
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


def http_retries(config: MeshConfig) -> dict[str, int | str] | None:
    """The VirtualService ``http[].retries`` block, or ``None`` when no route setting is tuned.
    ``perTryTimeout`` alone comes with Istio's default ``attempts: 2``: Istio drops the whole
    retry policy of a ``retries`` block whose ``attempts`` is 0 or absent (``ConvertPolicy``)."""
    if config.retry_attempts is None and config.per_try_timeout_ms is None:
        return None
    retries: dict[str, int | str] = {
        "attempts": config.retry_attempts if config.retry_attempts is not None else DEFAULT_RETRY_ATTEMPTS}
    if config.per_try_timeout_ms is not None:
        retries["perTryTimeout"] = istio_duration(config.per_try_timeout_ms)
    return retries


def virtual_service(config: MeshConfig, service: ServiceRef) -> dict[str, Any] | None:
    """The VirtualService for the service host (one HTTP route to it, with the tuned retries),
    valid against the Istio 1.30 CRD; ``None`` when no route setting is tuned (Istio's default
    route applies, no VirtualService is needed)."""
    retries = http_retries(config)
    if retries is None:
        return None
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": service.name,
            "namespace": service.namespace,
            "labels": {"app.kubernetes.io/managed-by": "autotune"},
        },
        "spec": {
            "hosts": [service.host],
            "http": [{
                "route": [{"destination": {"host": service.host, "port": {"number": service.port}}}],
                "retries": retries,
            }],
        },
    }


def sidecar_annotations(config: MeshConfig, sidecar: SidecarResources) -> dict[str, str]:
    """Pod-template annotations for the sidecar. The resource annotations are always written
    (Istio ignores its defaults as soon as one is present): the CPU request is ``proxy.cpuRequest``
    or the spec's, capped at the limit because Kubernetes rejects a request above its limit; the
    CPU limit is left out with ``proxy.cpuLimit: unset`` (no limit). ``proxy.istio.io/config`` is
    only written when concurrency is set; otherwise pilot-agent derives it from the CPU limit."""
    limit = config.limit_cores
    request = config.cpu_request if config.cpu_request is not None else sidecar.cpu_request_cores
    annotations = {ANN_CPU: format_cpu(min(request, limit) if limit is not None else request)}
    if limit is not None:
        annotations[ANN_CPU_LIMIT] = format_cpu(limit)
    annotations[ANN_MEMORY] = sidecar.memory_request
    annotations[ANN_MEMORY_LIMIT] = sidecar.memory_limit
    if config.concurrency is not None:
        annotations[ANN_PROXY_CONFIG] = f"concurrency: {config.concurrency}"
    return annotations


def deployment_patch(config: MeshConfig, sidecar: SidecarResources) -> dict[str, Any]:
    """A merge patch for the Deployment (``kubectl patch deployment NAME --type merge --patch-file …``)."""
    return {"spec": {"template": {"metadata": {"annotations": sidecar_annotations(config, sidecar)}}}}


def manifest_files(config: MeshConfig, service: ServiceRef, sidecar: SidecarResources) -> dict[str, str]:
    """The files a user applies for ``config``, by name: ``destinationrule.yaml``,
    ``deployment-patch.yaml`` and, only when a route setting is tuned, ``virtualservice.yaml``."""
    files = {"destinationrule.yaml": to_yaml(destination_rule(config, service)),
             "deployment-patch.yaml": to_yaml(deployment_patch(config, sidecar))}
    vs = virtual_service(config, service)
    if vs is not None:
        files["virtualservice.yaml"] = to_yaml(vs)
    return files


def to_yaml(obj: Mapping[str, object]) -> str:
    """Block-style YAML with keys in insertion order, as a user would write it."""
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
