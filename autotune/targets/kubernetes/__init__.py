"""The Kubernetes target: Istio sidecars of one Deployment in a staging namespace."""

from __future__ import annotations

from autotune.targets.kubernetes._target import KubernetesTarget, MetricsReader

__all__ = ["KubernetesTarget", "MetricsReader"]
