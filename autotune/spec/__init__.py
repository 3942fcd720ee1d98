"""Study specs (``search-spaces/*.yaml``): parsed once, at the edge, into typed models.

Every problem is reported with the file, the field path and the rule broken, before anything runs;
reading a spec creates nothing and imports nothing heavy (no Optuna, pandas, SQLAlchemy).
"""

from __future__ import annotations

from autotune.mesh import ServiceRef, SidecarResources
from autotune.spec._duration import format_duration, parse_duration
from autotune.spec._load import load_spec
from autotune.spec._models import (
    DEFAULT_SCENARIO,
    DEFAULT_STORAGE,
    MAX_FILE_BYTES,
    SCENARIO_METRICS,
    Constraints,
    ConstraintSpec,
    EndpointFault,
    KubernetesTargetSpec,
    LoadSpec,
    LocalTargetSpec,
    MeasurementSpec,
    Objective,
    ParamRange,
    PrometheusSpec,
    Scenario,
    ScenarioSpec,
    SearchParam,
    ServiceTime,
    StudySettings,
    StudySpec,
    Timing,
    UpstreamSpec,
    parse_spec,
    split_metric,
)
from autotune.spec._storage_url import check_storage_url

__all__ = [
    "DEFAULT_SCENARIO",
    "DEFAULT_STORAGE",
    "MAX_FILE_BYTES",
    "SCENARIO_METRICS",
    "ConstraintSpec",
    "Constraints",
    "EndpointFault",
    "KubernetesTargetSpec",
    "LoadSpec",
    "LocalTargetSpec",
    "MeasurementSpec",
    "Objective",
    "ParamRange",
    "PrometheusSpec",
    "Scenario",
    "ScenarioSpec",
    "SearchParam",
    "ServiceRef",
    "ServiceTime",
    "SidecarResources",
    "StudySettings",
    "StudySpec",
    "Timing",
    "UpstreamSpec",
    "check_storage_url",
    "format_duration",
    "load_spec",
    "parse_duration",
    "parse_spec",
    "split_metric",
]
