"""Targets: where settings are applied and measured. ``local`` (real Envoy) is the default."""

from __future__ import annotations

from autotune.spec import StudySpec
from autotune.targets._base import Observed, ProxyUsage, StateStore, Target

__all__ = ["Observed", "ProxyUsage", "StateStore", "Target", "make_target"]


def make_target(spec: StudySpec) -> Target:
    """The target the spec names, not yet started."""
    from autotune.spec import LocalTargetSpec

    if isinstance(spec.target, LocalTargetSpec):
        from autotune.targets.local import LocalTarget

        return LocalTarget(spec.target, spec.service, timing=spec.timing)
    from autotune.targets.kubernetes import KubernetesTarget

    return KubernetesTarget(spec.target, spec.service, spec.sidecar, timing=spec.timing,
                            service_faults=any(s.faults for s in spec.scenario_list()))
