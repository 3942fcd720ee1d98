"""The tunable mesh settings, by their Istio names, with the values Istio accepts and its defaults.

Everything else (the spec loader, the translation, the targets) looks parameters up here, so a new
setting is added in one place. Facts come from ``shared/reference/istio-mapping.md`` §1a–1c.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Literal

from autotune.mesh._quantity import format_cpu

#: Istio writes this for every unset circuit-breaker limit (2^32 - 1).
ISTIO_UNSET_LIMIT = 4294967295
#: int32 fields of a DestinationRule: the schema says int32, istiod rejects negatives, 0 means unset.
INT32_MAX = 2**31 - 1
#: Istio's chart default for ``global.proxy.resources.limits.cpu`` (2000m), in cores.
DEFAULT_CPU_LIMIT = 2.0
#: UInt32 wrapper fields of a DestinationRule (outlier detection counts): 0 is a value (it disables).
UINT32_MAX = 2**32 - 1
#: The value of ``proxy.cpuLimit`` that means "no CPU limit" (no ``proxyCPULimit`` annotation).
NO_LIMIT = "unset"
#: ``loadBalancer.simple`` values autotune searches (Istio's others: PASSTHROUGH, deprecated LEAST_CONN).
LB_POLICIES = ("LEAST_REQUEST", "ROUND_ROBIN", "RANDOM")
#: Upper bound of a duration setting, in ms (one day; Envoy and Istio accept more).
MAX_DURATION_MS = 86_400_000
#: Upper bound autotune allows for VirtualService ``retries.attempts``.
MAX_RETRY_ATTEMPTS = 100

Kind = Literal["int", "cpu", "duration", "choice"]
ParamValue = int | float | str


@dataclass(frozen=True)
class ParamInfo:
    """What one tunable setting is and which values are legal for it."""

    name: str
    #: ``int``; ``cpu`` (cores); ``duration`` (whole milliseconds); ``choice`` (one of ``choices``).
    kind: Kind
    field: str
    minimum: float
    maximum: float
    help: str
    istio_default: str
    choices: tuple[str, ...] = ()
    #: Where the setting is written: DestinationRule, VirtualService or the pod template.
    resource: Literal["destinationrule", "virtualservice", "pod"] = "destinationrule"


PARAMETERS: dict[str, ParamInfo] = {
    p.name: p
    for p in (
        ParamInfo("connectionPool.tcp.maxConnections", "int", "max_connections", 1, INT32_MAX,
                  "max TCP connections from one sidecar to the service (all endpoints, all workers)",
                  "unset (Envoy gets 4294967295)"),
        ParamInfo("connectionPool.http.http1MaxPendingRequests", "int", "http1_max_pending_requests",
                  1, INT32_MAX, "requests queued waiting for a connection",
                  "unset (Envoy gets 4294967295)"),
        ParamInfo("connectionPool.http.http2MaxRequests", "int", "http2_max_requests", 1, INT32_MAX,
                  "concurrent in-flight requests (HTTP/1.1 too)", "unset (Envoy gets 4294967295)"),
        ParamInfo("connectionPool.http.maxRequestsPerConnection", "int",
                  "max_requests_per_connection", 1, 2**29,
                  "requests per upstream connection; 1 disables keep-alive", "unset (unlimited)"),
        ParamInfo("connectionPool.http.maxRetries", "int", "max_retries", 1, INT32_MAX,
                  "retries outstanding at once across the cluster", "unset (Envoy gets 4294967295)"),
        ParamInfo("connectionPool.http.idleTimeout", "duration", "idle_timeout_ms", 1, MAX_DURATION_MS,
                  "close an upstream connection with no active request after this long",
                  "unset (Envoy's 1h)"),
        ParamInfo("connectionPool.tcp.connectTimeout", "duration", "connect_timeout_ms", 1,
                  MAX_DURATION_MS, "TCP connect timeout to an endpoint", "unset (mesh connectTimeout 10s)"),
        ParamInfo("outlierDetection.consecutive5xxErrors", "int", "consecutive_5xx_errors", 0, UINT32_MAX,
                  "consecutive 5xx (or connect failures) that eject an endpoint; 0 disables",
                  "unset (no outlier detection)"),
        ParamInfo("outlierDetection.consecutiveGatewayErrors", "int", "consecutive_gateway_errors", 0,
                  UINT32_MAX, "consecutive 502/503/504 that eject an endpoint; 0 disables",
                  "unset (no outlier detection)"),
        ParamInfo("outlierDetection.interval", "duration", "outlier_interval_ms", 1, MAX_DURATION_MS,
                  "time between ejection sweeps", "unset (Envoy's 10s)"),
        ParamInfo("outlierDetection.baseEjectionTime", "duration", "base_ejection_time_ms", 1,
                  MAX_DURATION_MS, "ejection time (times the number of ejections)", "unset (Envoy's 30s)"),
        ParamInfo("outlierDetection.maxEjectionPercent", "int", "max_ejection_percent", 1, 100,
                  "most endpoints ejected at once, in percent", "unset (Envoy's 10%)"),
        ParamInfo("loadBalancer.simple", "choice", "lb_simple", 0, 0,
                  "load-balancing policy", "LEAST_REQUEST", choices=LB_POLICIES),
        ParamInfo("retries.attempts", "int", "retry_attempts", 0, MAX_RETRY_ATTEMPTS,
                  "VirtualService retries per request; 0 disables retries",
                  "unset (Istio's default route policy: 2)", resource="virtualservice"),
        ParamInfo("retries.perTryTimeout", "duration", "per_try_timeout_ms", 1, MAX_DURATION_MS,
                  "VirtualService timeout of each attempt", "unset (none)", resource="virtualservice"),
        ParamInfo("proxy.concurrency", "int", "concurrency", 1, 64,
                  "Envoy worker threads (proxy.istio.io/config concurrency)",
                  "unset (ceil of the CPU limit: 2 workers with the 2000m default)", resource="pod"),
        ParamInfo("proxy.cpuRequest", "cpu", "cpu_request", 0.001, 64,
                  "sidecar CPU request in cores (sidecar.istio.io/proxyCPU)",
                  "the spec's sidecar.cpuRequest (Istio's chart: 100m)", resource="pod"),
        ParamInfo("proxy.cpuLimit", "cpu", "cpu_limit", 0.01, 64,
                  "sidecar CPU limit in cores (sidecar.istio.io/proxyCPULimit); 'unset' = no limit",
                  "2000m", resource="pod"),
    )
}
#: Settings written on the pod template (the rest are Istio traffic resources).
POD_FIELDS = tuple(p.field for p in PARAMETERS.values() if p.resource == "pod")


@dataclass(frozen=True)
class MeshConfig:
    """One candidate configuration. ``None`` means "left out": Istio's default applies."""

    max_connections: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout_ms: int | None = None
    connect_timeout_ms: int | None = None
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    outlier_interval_ms: int | None = None
    base_ejection_time_ms: int | None = None
    max_ejection_percent: int | None = None
    lb_simple: str | None = None
    retry_attempts: int | None = None
    per_try_timeout_ms: int | None = None
    concurrency: int | None = None
    cpu_request: float | None = None
    #: Cores; ``None`` = Istio's default limit (2000m). See ``no_cpu_limit``.
    cpu_limit: float | None = None
    #: No CPU limit at all (``proxy.cpuLimit: unset``); ``cpu_limit`` is then ``None``.
    no_cpu_limit: bool = False

    def __post_init__(self) -> None:
        if self.no_cpu_limit and self.cpu_limit is not None:
            raise ValueError(f"no_cpu_limit and cpu_limit={self.cpu_limit} contradict each other")
        if self.lb_simple is not None and self.lb_simple not in LB_POLICIES:
            raise ValueError(f"loadBalancer.simple must be one of {', '.join(LB_POLICIES)}, "
                             f"got {self.lb_simple!r}")

    @classmethod
    def from_params(cls, params: dict[str, ParamValue]) -> MeshConfig:
        """Build from Istio-named values (``{"proxy.concurrency": 2, "loadBalancer.simple":
        "RANDOM", "proxy.cpuLimit": "unset", …}``; durations in ms); unknown names raise KeyError."""
        kwargs: dict[str, object] = {}
        for name, value in params.items():
            info = PARAMETERS[name]
            if name == "proxy.cpuLimit" and value == NO_LIMIT:
                kwargs["no_cpu_limit"] = True
            elif info.kind == "choice":
                kwargs[info.field] = str(value)
            else:
                kwargs[info.field] = float(value) if info.kind == "cpu" else int(value)
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_params(self) -> dict[str, ParamValue]:
        """The set values by Istio name (left-out settings are omitted; no CPU limit is ``"unset"``)."""
        by_field = {p.field: p.name for p in PARAMETERS.values()}
        out: dict[str, ParamValue] = {by_field[f.name]: getattr(self, f.name) for f in fields(self)
                                      if f.name in by_field and getattr(self, f.name) is not None}
        if self.no_cpu_limit:
            out["proxy.cpuLimit"] = NO_LIMIT
        return out

    def tunes(self, resource: str) -> bool:
        """Whether a setting written on ``resource`` (``virtualservice``, …) is set."""
        return any(p.resource == resource and getattr(self, p.field) is not None
                   for p in PARAMETERS.values()) or (resource == "pod" and self.no_cpu_limit)

    @property
    def limit_cores(self) -> float | None:
        """The sidecar's CPU limit in cores with Istio's default filled in; ``None``: no limit."""
        if self.no_cpu_limit:
            return None
        return self.cpu_limit if self.cpu_limit is not None else DEFAULT_CPU_LIMIT

    @property
    def effective_cpu_limit(self) -> float:
        """The CPU the sidecar may use, in cores: its limit, or with no limit the node's CPU count
        (what the downward API reports for ``limits.cpu`` then; here: this machine's)."""
        limit = self.limit_cores
        return limit if limit is not None else float(os.cpu_count() or 1)

    def request_cores(self, default: float) -> float:
        """The sidecar's CPU request in cores: ``proxy.cpuRequest`` or ``default`` (the spec's
        ``sidecar.cpuRequest``), capped at the limit as the annotations write it."""
        request = self.cpu_request if self.cpu_request is not None else default
        limit = self.limit_cores
        return min(request, limit) if limit is not None else request

    @property
    def effective_concurrency(self) -> int:
        """Envoy worker threads: explicit, else pilot-agent's ceil(``ISTIO_CPU_LIMIT``), which is
        the limit rounded up, or the node's CPU count with no limit (Istio 1.30 does not derive it
        from the request; istio/istio#61683 asks for that)."""
        if self.concurrency is not None:
            return self.concurrency
        return max(1, math.ceil(round(self.effective_cpu_limit, 3)))

    def describe(self) -> str:
        """Short human text, e.g. ``maxConnections=64 concurrency=2 cpuLimit=500m``; ``istio-defaults``."""
        parts = []
        for name, value in self.to_params().items():
            info = PARAMETERS[name]
            short = name.rsplit(".", 1)[-1]
            if info.kind == "cpu" and not isinstance(value, str):
                text = format_cpu(value)
            elif info.kind == "duration":
                text = f"{value}ms"
            else:
                text = str(value)
            parts.append(f"{short}={text}")
        return " ".join(parts) or "istio-defaults"
