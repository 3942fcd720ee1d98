"""Study specs (``search-spaces/*.yaml``): parsed once, at the edge, into typed models.

Every problem is reported with the file, the field path and the rule broken, before anything runs.
"""

from __future__ import annotations

from autotune.mesh import ServiceRef, SidecarResources
from autotune.spec._load import load_spec
from autotune.spec._models import (
    DEFAULT_STORAGE,
    Constraints,
    KubernetesTargetSpec,
    LoadSpec,
    LocalTargetSpec,
    MeasurementSpec,
    Objective,
    ParamRange,
    PrometheusSpec,
    SearchParam,
    StudySettings,
    StudySpec,
    Timing,
    UpstreamSpec,
    parse_spec,
)

__all__ = [
    "DEFAULT_STORAGE",
    "Constraints",
    "KubernetesTargetSpec",
    "LoadSpec",
    "LocalTargetSpec",
    "MeasurementSpec",
    "Objective",
    "ParamRange",
    "PrometheusSpec",
    "SearchParam",
    "ServiceRef",
    "SidecarResources",
    "StudySettings",
    "StudySpec",
    "Timing",
    "UpstreamSpec",
    "load_spec",
    "parse_spec",
]
