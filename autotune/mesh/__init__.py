"""The mesh settings autotune tunes and how Istio and Envoy see them.

Settings by their Istio names (``PARAMETERS``, ``MeshConfig``), Kubernetes quantities, and the two
translations: what a user applies (DestinationRule, pod-template annotations) and what Istio 1.30
generates for the client sidecar's Envoy cluster.
"""

from __future__ import annotations

from autotune.mesh._envoy import DEFAULT_CONNECT_TIMEOUT, HPO_KEY, cluster_name, envoy_cluster
from autotune.mesh._istio import (
    ANN_CPU,
    ANN_CPU_LIMIT,
    ANN_MEMORY,
    ANN_MEMORY_LIMIT,
    ANN_PROXY_CONFIG,
    connection_pool,
    deployment_patch,
    destination_rule,
    sidecar_annotations,
    to_yaml,
)
from autotune.mesh._quantity import format_cpu, parse_cpu, parse_memory
from autotune.mesh._service import ServiceRef, SidecarResources
from autotune.mesh._settings import (
    DEFAULT_CPU_LIMIT,
    INT32_MAX,
    ISTIO_UNSET_LIMIT,
    PARAMETERS,
    MeshConfig,
    ParamInfo,
)

__all__ = [
    "ANN_CPU",
    "ANN_CPU_LIMIT",
    "ANN_MEMORY",
    "ANN_MEMORY_LIMIT",
    "ANN_PROXY_CONFIG",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_CPU_LIMIT",
    "HPO_KEY",
    "INT32_MAX",
    "ISTIO_UNSET_LIMIT",
    "PARAMETERS",
    "MeshConfig",
    "ParamInfo",
    "ServiceRef",
    "SidecarResources",
    "cluster_name",
    "connection_pool",
    "deployment_patch",
    "destination_rule",
    "envoy_cluster",
    "format_cpu",
    "parse_cpu",
    "parse_memory",
    "sidecar_annotations",
    "to_yaml",
]
