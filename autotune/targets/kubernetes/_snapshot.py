"""The baseline a study must put back: what autotune may change, as read before the first trial.

It is JSON so that it can live in the study (``StateStore``) and survive a crash.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from autotune.mesh import ANN_CPU, ANN_CPU_LIMIT, ANN_MEMORY, ANN_MEMORY_LIMIT, ANN_PROXY_CONFIG

#: The pod-template annotations autotune writes, hence snapshots and restores.
MANAGED_ANNOTATIONS = (ANN_PROXY_CONFIG, ANN_CPU, ANN_CPU_LIMIT, ANN_MEMORY, ANN_MEMORY_LIMIT)
STATE_KEY = "kubernetes.snapshot"
_VERSION = 2  # 2 added the VirtualService; a version-1 snapshot (none read) is still accepted


@dataclass(frozen=True)
class Snapshot:
    """The DestinationRule's ``spec.trafficPolicy`` (``dr_exists=False``: there was no DR) and the
    managed pod-template annotations (``None``: absent), of one namespace/deployment/DR; and the
    VirtualService's ``spec``, read before autotune first writes it (``virtual_service`` is
    ``None`` until then; ``vs_spec`` is ``None`` when there was none)."""

    namespace: str
    deployment: str
    destination_rule: str
    dr_exists: bool
    traffic_policy: dict[str, Any] | None
    annotations: dict[str, str | None] = field(default_factory=dict)
    virtual_service: str | None = None
    vs_spec: dict[str, Any] | None = None

    @classmethod
    def read(cls, namespace: str, deployment: dict[str, Any], dr_name: str,
             dr: dict[str, Any] | None) -> Snapshot:
        return cls(namespace=namespace, deployment=deployment["metadata"]["name"], destination_rule=dr_name,
                   dr_exists=dr is not None, traffic_policy=traffic_policy_of(dr),
                   annotations=managed_annotations(deployment))

    def to_json(self) -> dict[str, Any]:
        return {"version": _VERSION, "namespace": self.namespace, "deployment": self.deployment,
                "destinationRule": self.destination_rule, "drExists": self.dr_exists,
                "trafficPolicy": copy.deepcopy(self.traffic_policy), "annotations": dict(self.annotations),
                "virtualService": None if self.virtual_service is None else {
                    "name": self.virtual_service, "spec": copy.deepcopy(self.vs_spec)}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        if data.get("version") not in (1, _VERSION):
            raise ValueError(f"unknown snapshot version {data.get('version')!r}")
        vs = data.get("virtualService")
        return cls(namespace=data["namespace"], deployment=data["deployment"],
                   destination_rule=data["destinationRule"], dr_exists=bool(data["drExists"]),
                   traffic_policy=data.get("trafficPolicy"),
                   annotations={k: data["annotations"].get(k) for k in MANAGED_ANNOTATIONS},
                   virtual_service=vs["name"] if vs else None, vs_spec=vs.get("spec") if vs else None)


def traffic_policy_of(dr: dict[str, Any] | None) -> dict[str, Any] | None:
    if dr is None:
        return None
    policy = (dr.get("spec") or {}).get("trafficPolicy")
    return copy.deepcopy(policy) if isinstance(policy, dict) else None


def template_annotations(deployment: dict[str, Any]) -> dict[str, str]:
    tpl = (deployment.get("spec") or {}).get("template") or {}
    return dict((tpl.get("metadata") or {}).get("annotations") or {})


def managed_annotations(deployment: dict[str, Any]) -> dict[str, str | None]:
    current = template_annotations(deployment)
    return {k: current.get(k) for k in MANAGED_ANNOTATIONS}


def merge_patch(current: Any, desired: Any) -> Any:
    """The RFC 7386 JSON merge patch turning ``current`` into ``desired`` (``None`` in ``desired``
    or a missing key means "absent"); ``{}`` when they are equal."""
    if not isinstance(current, dict) or not isinstance(desired, dict):
        return copy.deepcopy(desired)
    patch: dict[str, Any] = {}
    for key in current.keys() - desired.keys():
        patch[key] = None
    for key, value in desired.items():
        if value is None:
            if key in current:
                patch[key] = None
        elif key not in current:
            patch[key] = copy.deepcopy(value)
        elif current[key] != value:
            patch[key] = merge_patch(current[key], value) if isinstance(value, dict) and isinstance(
                current[key], dict) else copy.deepcopy(value)
    return patch
