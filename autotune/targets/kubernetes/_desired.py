"""What one trial's objects look like: ``mapping``'s output merged into what the user already has.

The managed ``trafficPolicy`` fields are set or removed (back to Istio's default), the
VirtualService's HTTP routes get the tuned ``retries``; every other field of the user's
DestinationRule and VirtualService and every other key of their ``proxy.istio.io/config`` is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import yaml

from autotune.mesh import ANN_PROXY_CONFIG, PARAMETERS, MeshConfig, sidecar_annotations, traffic_policy
from autotune.spec import SidecarResources
from autotune.targets.kubernetes._snapshot import MANAGED_ANNOTATIONS

#: DestinationRule settings the target always manages: a config that leaves one out removes it
#: (Istio's default), whether or not the search space tunes it (the circuit breakers).
ALWAYS_MANAGED = frozenset({
    "connectionPool.tcp.maxConnections", "connectionPool.http.http1MaxPendingRequests",
    "connectionPool.http.http2MaxRequests", "connectionPool.http.maxRequestsPerConnection",
    "connectionPool.http.maxRetries",
})
#: Parameters written on the DestinationRule's ``trafficPolicy``; each name is its path there.
DR_PARAMETERS = frozenset(p.name for p in PARAMETERS.values() if p.resource == "destinationrule")
#: Parameters written on the VirtualService's HTTP routes (``retries``).
VS_PARAMETERS = frozenset(p.name for p in PARAMETERS.values() if p.resource == "virtualservice")


def _remove(node: dict[str, Any], path: list[str]) -> None:
    """Delete ``path`` from ``node``, and the blocks along it that this leaves empty."""
    head, *rest = path
    if head not in node:
        return
    if rest:
        child = node[head]
        if isinstance(child, dict):
            _remove(child, rest)
            if not child:
                del node[head]
        return
    del node[head]


def _merge(node: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _merge(node[key], value)
        else:
            node[key] = copy.deepcopy(value)


def managed_dr_fields(config: MeshConfig, tuned: Iterable[str] = ()) -> frozenset[str]:
    """The ``trafficPolicy`` fields an apply of ``config`` owns: the circuit breakers, every
    DestinationRule parameter of the search space (``tuned``), and every one ``config`` sets."""
    return ALWAYS_MANAGED | (frozenset(tuned) & DR_PARAMETERS) | frozenset(
        n for n in config.to_params() if n in DR_PARAMETERS)


def desired_traffic_policy(current: dict[str, Any] | None, config: MeshConfig,
                           tuned: Iterable[str] = ()) -> dict[str, Any] | None:
    """``current`` with the managed fields (``managed_dr_fields``) as ``config`` has them: set
    ones written as Istio's ``traffic_policy`` writes them, left-out ones removed (Istio's
    default), blocks that end up empty dropped; the user's other fields are kept. "All
    defaults" on a DR without policy stays ``None``."""
    policy = copy.deepcopy(current) if current else {}
    for name in sorted(managed_dr_fields(config, tuned)):
        _remove(policy, name.split("."))
    _merge(policy, traffic_policy(config))
    if not policy and current is None:
        return None
    return policy


def with_retries(vs_spec: dict[str, Any], retries: dict[str, Any] | None) -> dict[str, Any]:
    """``vs_spec`` with ``retries`` on every HTTP route (``None``: removed, Istio's default retry
    policy applies); every other field is kept."""
    spec = copy.deepcopy(vs_spec)
    for route in spec.get("http") or []:
        route.pop("retries", None)
        if retries is not None:
            route["retries"] = copy.deepcopy(retries)
    return spec


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
