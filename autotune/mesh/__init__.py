"""The mesh settings autotune tunes and how Istio and Envoy see them.

Settings by their Istio names (``PARAMETERS``, ``MeshConfig``), Kubernetes quantities, and the two
translations: what a user applies (DestinationRule, VirtualService, pod-template annotations) and
what Istio 1.30 generates for the client sidecar's Envoy cluster and route.
"""

from __future__ import annotations

from autotune.mesh._envoy import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RETRY_ON,
    HPO_KEY,
    PREVIOUS_HOSTS,
    cluster_name,
    envoy_cluster,
    envoy_duration,
    envoy_outlier_detection,
    envoy_retry_policy,
    envoy_route,
)
from autotune.mesh._istio import (
    ANN_CPU,
    ANN_CPU_LIMIT,
    ANN_MEMORY,
    ANN_MEMORY_LIMIT,
    ANN_PROXY_CONFIG,
    DEFAULT_RETRY_ATTEMPTS,
    connection_pool,
    deployment_patch,
    destination_rule,
    http_retries,
    istio_duration,
    manifest_files,
    outlier_detection,
    sidecar_annotations,
    to_yaml,
    traffic_policy,
    virtual_service,
)
from autotune.mesh._quantity import format_cpu, parse_cpu, parse_memory
from autotune.mesh._service import ServiceRef, SidecarResources
from autotune.mesh._settings import (
    DEFAULT_CPU_LIMIT,
    INT32_MAX,
    ISTIO_UNSET_LIMIT,
    LB_POLICIES,
    MAX_DURATION_MS,
    NO_LIMIT,
    PARAMETERS,
    POD_FIELDS,
    UINT32_MAX,
    MeshConfig,
    ParamInfo,
    ParamValue,
)

__all__ = [
    "ANN_CPU",
    "ANN_CPU_LIMIT",
    "ANN_MEMORY",
    "ANN_MEMORY_LIMIT",
    "ANN_PROXY_CONFIG",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_CPU_LIMIT",
    "DEFAULT_RETRY_ATTEMPTS",
    "DEFAULT_RETRY_ON",
    "HPO_KEY",
    "INT32_MAX",
    "ISTIO_UNSET_LIMIT",
    "LB_POLICIES",
    "MAX_DURATION_MS",
    "NO_LIMIT",
    "PARAMETERS",
    "POD_FIELDS",
    "PREVIOUS_HOSTS",
    "UINT32_MAX",
    "MeshConfig",
    "ParamInfo",
    "ParamValue",
    "ServiceRef",
    "SidecarResources",
    "cluster_name",
    "connection_pool",
    "deployment_patch",
    "destination_rule",
    "envoy_cluster",
    "envoy_duration",
    "envoy_outlier_detection",
    "envoy_retry_policy",
    "envoy_route",
    "format_cpu",
    "http_retries",
    "istio_duration",
    "manifest_files",
    "outlier_detection",
    "parse_cpu",
    "parse_memory",
    "sidecar_annotations",
    "to_yaml",
    "traffic_policy",
    "virtual_service",
]
