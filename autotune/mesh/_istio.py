"""What a user applies for a config: a ``networking.istio.io/v1`` DestinationRule and the
Deployment's pod-template annotations (``proxy.istio.io/config`` and the four
``sidecar.istio.io/proxy*``). Source of truth: ``shared/reference/istio-mapping.md`` §1a–1c.
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


def connection_pool(config: MeshConfig) -> dict[str, dict[str, int]]:
    """The DestinationRule ``trafficPolicy.connectionPool`` block (``tcp`` and ``http``, each
    only with the fields set); empty when nothing is set."""
    tcp: dict[str, int] = {}
    http: dict[str, int] = {}
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
    pool: dict[str, dict[str, int]] = {}
    if tcp:
        pool["tcp"] = tcp
    if http:
        pool["http"] = http
    return pool


def destination_rule(config: MeshConfig, service: ServiceRef) -> dict[str, Any]:
    """The DestinationRule a user applies for this config (valid against the Istio 1.30 CRD), as
    the mutable JSON body the Kubernetes client sends."""
    pool = connection_pool(config)
    spec: dict[str, object] = {"host": service.host}
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


def to_yaml(obj: Mapping[str, object]) -> str:
    """Block-style YAML with keys in insertion order, as a user would write it."""
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
