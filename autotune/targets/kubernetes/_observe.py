"""What the cluster runs with, read back from the API server: the stored DestinationRule and the
RUNNING pods of the Deployment (not its template), so a config that never rolled out shows."""

from __future__ import annotations

from collections import Counter
from typing import Any

from autotune.errors import FailReason, TrialFailed
from autotune.mesh import ANN_CPU_LIMIT, ANN_PROXY_CONFIG, MeshConfig, parse_cpu
from autotune.targets._base import Observed
from autotune.targets.kubernetes._desired import proxy_concurrency

#: DestinationRule connection-pool field → ``MeshConfig`` field.
_POOL = {("tcp", "maxConnections"): "max_connections",
         ("http", "http1MaxPendingRequests"): "http1_max_pending_requests",
         ("http", "http2MaxRequests"): "http2_max_requests",
         ("http", "maxRequestsPerConnection"): "max_requests_per_connection",
         ("http", "maxRetries"): "max_retries"}
SIDECAR_CONTAINER = "istio-proxy"


def pool_of(traffic_policy: dict[str, Any] | None) -> MeshConfig:
    """The tuned connection-pool fields of a ``trafficPolicy`` (0 and absent are Istio's unset)."""
    pool = (traffic_policy or {}).get("connectionPool") or {}
    values: dict[str, int] = {}
    for (block, name), attr in _POOL.items():
        value = (pool.get(block) or {}).get(name)
        if isinstance(value, int) and value != 0:
            values[attr] = value
    return MeshConfig(**values)  # type: ignore[arg-type]  # int fields only (_POOL)


def _meta(pod: dict[str, Any]) -> dict[str, Any]:
    return pod.get("metadata") or {}


def current_pods(pods: list[dict[str, Any]], prefer_hash: str | None) -> tuple[str | None, list[dict[str, Any]]]:
    """The non-terminating pods of one ReplicaSet: ``prefer_hash``'s if any run, else the largest."""
    alive = [p for p in pods if not _meta(p).get("deletionTimestamp")]
    by_hash = Counter((_meta(p).get("labels") or {}).get("pod-template-hash") for p in alive)
    if not by_hash:
        return None, []
    chosen = prefer_hash if prefer_hash in by_hash else by_hash.most_common(1)[0][0]
    return chosen, [p for p in alive if (_meta(p).get("labels") or {}).get("pod-template-hash") == chosen]


def _sidecar_cpu_limit(pod: dict[str, Any]) -> float | None:
    """The injected ``istio-proxy`` container's CPU limit, else the pod's annotation, else none."""
    spec = pod.get("spec") or {}
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:  # native sidecar
        if c.get("name") == SIDECAR_CONTAINER:
            limit = ((c.get("resources") or {}).get("limits") or {}).get("cpu")
            return parse_cpu(limit) if limit is not None else None
    annotation = (_meta(pod).get("annotations") or {}).get(ANN_CPU_LIMIT)
    return parse_cpu(annotation) if annotation is not None else None


def _pod_settings(pod: dict[str, Any]) -> tuple[int, float]:
    """(worker threads, CPU limit in force) one pod's sidecar runs with: ``concurrency`` from its
    ``proxy.istio.io/config``, else pilot-agent's ceil(CPU limit)."""
    limit = _sidecar_cpu_limit(pod)
    # No CPU limit: pilot-agent's ISTIO_CPU_LIMIT (downward API) is the node's allocatable CPU,
    # which the target cannot read (nodes are cluster-scoped); like ``Observed.expected`` it
    # assumes the node has as many cores as the machine autotune runs on.
    in_force = MeshConfig(cpu_limit=limit, no_cpu_limit=limit is None)
    concurrency = proxy_concurrency((_meta(pod).get("annotations") or {}).get(ANN_PROXY_CONFIG))
    if concurrency is None:
        concurrency = in_force.effective_concurrency
    return concurrency, in_force.effective_cpu_limit


def observe(traffic_policy: dict[str, Any] | None, pods: list[dict[str, Any]],
            prefer_hash: str | None) -> Observed:
    """The ``Observed`` of the DR's pool and the current ReplicaSet's running pods.

    Raises ``TrialFailed(FailReason.NOT_READY, …)`` when no pod runs, or when the pods of that
    ReplicaSet disagree (a rollout in progress)."""
    pod_hash, running = current_pods(pods, prefer_hash)
    if not running:
        raise TrialFailed(FailReason.NOT_READY, "no running pod of the deployment to read the sidecar from")
    settings = {_pod_settings(p) for p in running}
    if len(settings) > 1:
        raise TrialFailed(FailReason.NOT_READY, f"the pods of ReplicaSet {pod_hash} run different "
                          f"sidecar settings {sorted(settings, key=str)}")
    ((concurrency, limit),) = settings
    return Observed(pool=pool_of(traffic_policy), concurrency=concurrency, cpu_limit=limit,
                    details={"pod_template_hash": pod_hash, "pods": sorted(_meta(p).get("name", "") for p in running),
                             "traffic_policy": traffic_policy,
                             "pod_annotations": dict(_meta(running[0]).get("annotations") or {})})
