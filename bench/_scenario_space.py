"""The search space of the scenario landscape (``bench/record_landscape.py --scenarios`` records
it, ``bench/search_efficiency.py --scenarios`` searches it): the scenario spec's own parameters,
``proxy.cpuLimit`` also left unset (no limit), and the resilience knobs of issue 11."""

from __future__ import annotations

from typing import Any

from autotune.spec import StudySpec, load_spec

#: Added to the spec's parameters (by Istio name, as a spec writes them).
EXTRA_PARAMETERS: dict[str, dict[str, Any]] = {
    "connectionPool.http.maxRetries": {"low": 1, "high": 1024, "log": True},
    "outlierDetection.consecutive5xxErrors": {"low": 0, "high": 20},  # 0 disables
    "loadBalancer.simple": {"choices": ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"]},
}
#: Must be in the space (the spec's, else added with this range).
REQUIRED_PARAMETERS: dict[str, dict[str, Any]] = {
    "proxy.cpuLimit": {"low": "20m", "high": "2000m", "log": True},
    "proxy.concurrency": {"low": 1, "high": 4},
    "connectionPool.tcp.maxConnections": {"low": 1, "high": 1024, "log": True},
    "connectionPool.http.http1MaxPendingRequests": {"low": 1, "high": 1024, "log": True},
}


def scenario_space_spec(path: str) -> StudySpec:
    """The spec at ``path`` with the landscape's search space."""
    spec = load_spec(path)
    params: dict[str, dict[str, Any]] = {
        name: {k: v for k, v in r.items() if v is not None and v is not False}
        for name, r in spec.model_dump(by_alias=False)["parameters"].items()}
    for name, r in REQUIRED_PARAMETERS.items():
        params.setdefault(name, dict(r))
    params["proxy.cpuLimit"]["unset"] = True
    params.update({k: dict(v) for k, v in EXTRA_PARAMETERS.items()})
    return spec.with_overrides(parameters=params)
