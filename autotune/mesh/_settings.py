"""The tunable mesh settings, by their Istio names, with the values Istio accepts and its defaults.

Everything else (the spec loader, the translation, the targets) looks parameters up here, so a new
setting is added in one place. Facts come from ``shared/reference/istio-mapping.md`` §1a–1c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from autotune.mesh._quantity import format_cpu

#: Istio writes this for every unset circuit-breaker limit (2^32 - 1).
ISTIO_UNSET_LIMIT = 4294967295
#: int32 fields of a DestinationRule: the schema says int32, istiod rejects negatives, 0 means unset.
INT32_MAX = 2**31 - 1
#: Istio's chart default for ``global.proxy.resources.limits.cpu`` (2000m), in cores.
DEFAULT_CPU_LIMIT = 2.0


@dataclass(frozen=True)
class ParamInfo:
    """What one tunable setting is and which values are legal for it."""

    name: str
    kind: Literal["int", "cpu"]
    field: str
    minimum: float
    maximum: float
    help: str
    istio_default: str


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
        ParamInfo("proxy.concurrency", "int", "concurrency", 1, 64,
                  "Envoy worker threads (proxy.istio.io/config concurrency)",
                  "unset (ceil of the CPU limit: 2 workers with the 2000m default)"),
        ParamInfo("proxy.cpuLimit", "cpu", "cpu_limit", 0.01, 64,
                  "sidecar CPU limit in cores (sidecar.istio.io/proxyCPULimit)", "2000m"),
    )
}


@dataclass(frozen=True)
class MeshConfig:
    """One candidate configuration. ``None`` means "left out": Istio's default applies."""

    max_connections: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    concurrency: int | None = None
    cpu_limit: float | None = None

    @classmethod
    def from_params(cls, params: dict[str, int | float]) -> MeshConfig:
        """Build from Istio-named values (``{"proxy.concurrency": 2, …}``); unknown names raise KeyError."""
        kwargs: dict[str, int | float] = {}
        for name, value in params.items():
            info = PARAMETERS[name]
            kwargs[info.field] = float(value) if info.kind == "cpu" else int(value)
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_params(self) -> dict[str, int | float]:
        """The set values by Istio name (left-out settings are omitted)."""
        by_field = {p.field: p.name for p in PARAMETERS.values()}
        return {by_field[f.name]: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @property
    def effective_cpu_limit(self) -> float:
        """The sidecar's CPU limit in cores once Istio's default is filled in."""
        return self.cpu_limit if self.cpu_limit is not None else DEFAULT_CPU_LIMIT

    @property
    def effective_concurrency(self) -> int:
        """Envoy worker threads: explicit, else pilot-agent's ceil(CPU limit) (Kubernetes rounds up)."""
        if self.concurrency is not None:
            return self.concurrency
        return max(1, math.ceil(round(self.effective_cpu_limit, 3)))

    def describe(self) -> str:
        """Short human text, e.g. ``maxConnections=64 concurrency=2 cpuLimit=500m``; ``istio-defaults``."""
        parts = []
        for name, value in self.to_params().items():
            short = name.rsplit(".", 1)[-1]
            parts.append(f"{short}={format_cpu(value) if short == 'cpuLimit' else value}")
        return " ".join(parts) or "istio-defaults"
