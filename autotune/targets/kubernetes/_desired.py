"""What one trial's objects look like: ``mapping``'s output merged into what the user already has.

The tuned connection-pool fields are set or removed (back to Istio's default); every other field of
the user's DestinationRule and every other key of their ``proxy.istio.io/config`` is kept.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from autotune.mesh import ANN_PROXY_CONFIG, MeshConfig, connection_pool, sidecar_annotations
from autotune.spec import SidecarResources
from autotune.targets.kubernetes._snapshot import MANAGED_ANNOTATIONS

#: Settings the Kubernetes target does not write yet (``check_supported`` refuses them): the
#: DestinationRule's timeouts, outlier detection and load balancer, and the VirtualService.
NOT_YET_ON_KUBERNETES = frozenset({
    "connectionPool.http.idleTimeout", "connectionPool.tcp.connectTimeout",
    "outlierDetection.consecutive5xxErrors", "outlierDetection.consecutiveGatewayErrors",
    "outlierDetection.interval", "outlierDetection.baseEjectionTime",
    "outlierDetection.maxEjectionPercent", "loadBalancer.simple", "retries.attempts",
    "retries.perTryTimeout",
})
#: The connection-pool fields autotune tunes, by block; the user's other fields are kept.
TUNED_POOL_FIELDS = {
    "tcp": ("maxConnections",),
    "http": ("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries"),
}


def desired_traffic_policy(current: dict[str, Any] | None, config: MeshConfig) -> dict[str, Any] | None:
    """``current`` with the tuned ``connectionPool`` fields of ``config`` (left-out ones removed);
    blocks that end up empty are dropped, so "all defaults" on a DR without policy stays ``None``."""
    policy = copy.deepcopy(current) if current else {}
    pool = policy.get("connectionPool") or {}
    wanted = connection_pool(config)
    for block, names in TUNED_POOL_FIELDS.items():
        section = dict(pool.get(block) or {})
        for name in names:
            section.pop(name, None)
        section.update(wanted.get(block) or {})
        if section:
            pool[block] = section
        else:
            pool.pop(block, None)
    if pool:
        policy["connectionPool"] = pool
    else:
        policy.pop("connectionPool", None)
    if not policy and current is None:
        return None
    return policy


def _proxy_config_doc(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    doc = yaml.safe_load(value)
    return doc if isinstance(doc, dict) else {}


def desired_annotations(config: MeshConfig, sidecar: SidecarResources,
                        baseline: dict[str, str | None]) -> dict[str, str | None]:
    """The managed annotations for ``config``: the four resource ones always (``mapping``), and
    ``concurrency`` merged into the baseline's ``proxy.istio.io/config`` (other keys kept) or
    removed from it when unset; ``None`` = the annotation is absent."""
    out: dict[str, str | None] = dict.fromkeys(MANAGED_ANNOTATIONS)
    out.update(sidecar_annotations(config, sidecar))
    doc = _proxy_config_doc(baseline.get(ANN_PROXY_CONFIG))
    doc.pop("concurrency", None)
    if doc:  # the user's own ProxyConfig keys: keep them, change only concurrency
        if config.concurrency is not None:
            doc["concurrency"] = config.concurrency
        out[ANN_PROXY_CONFIG] = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return out


def annotations_equal(name: str, a: str | None, b: str | None) -> bool:
    """Equal as the injector reads them (a ProxyConfig YAML document is compared parsed)."""
    if name == ANN_PROXY_CONFIG and a is not None and b is not None:
        try:
            return bool(_proxy_config_doc(a) == _proxy_config_doc(b))
        except yaml.YAMLError:
            return a == b
    return a == b


def annotation_patch(current: dict[str, str | None], desired: dict[str, str | None]) -> dict[str, str | None]:
    """Only the managed annotations that differ; ``None`` deletes one (merge patch)."""
    return {k: desired.get(k) for k in MANAGED_ANNOTATIONS
            if not annotations_equal(k, current.get(k), desired.get(k))}


def proxy_concurrency(annotation: str | None) -> int | None:
    """``concurrency`` of a ``proxy.istio.io/config`` value, if it sets one."""
    try:
        value = _proxy_config_doc(annotation).get("concurrency")
    except yaml.YAMLError:
        return None
    return value if isinstance(value, int) else None
