"""What one load run measured over its window."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LoadResult:
    """Client-side figures over the measurement window only (warm-up excluded).

    Latency percentiles are over successful requests, in milliseconds with sub-millisecond
    resolution; failed requests count in ``error_rate`` so a config that rejects traffic fast
    never looks good.

    ``latency_*_ms`` are *raw*: each request from the moment it was sent to its response.
    ``latency_*_corrected_ms`` are free of coordinated omission: each request from the moment its
    user's schedule said it should start (a late request carries the time it waited to be sent,
    and slots a user skipped while it was stuck count as requests that waited until it got its
    next response); NaN when the load has no schedule (a custom locustfile). ``ok_latencies_ms``:
    the successful requests' latencies, corrected where known, sorted (for a latency SLO).
    """

    offered_rps: float
    achieved_rps: float
    requests: int
    failures: int
    window_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    status_counts: dict[str, int] = field(default_factory=dict)
    latency_p50_corrected_ms: float = math.nan
    latency_p95_corrected_ms: float = math.nan
    latency_p99_corrected_ms: float = math.nan
    ok_latencies_ms: tuple[float, ...] = ()

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 1.0

    @property
    def throughput_ratio(self) -> float:
        """Achieved over offered load; below 1 means the config (or the machine) could not keep up."""
        return self.achieved_rps / self.offered_rps if self.offered_rps else 0.0

    @property
    def goodput_rps(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.failures) / self.window_s if self.window_s > 0 else 0.0

    def goodput_slo_rps(self, slo_ms: float) -> float:
        """Successful requests per second answered within ``slo_ms`` (corrected latency where
        known). Without per-request latencies, the share within the SLO is interpolated between
        the percentiles (0 → 0, p50 → 0.5, p95 → 0.95, p99 → 0.99, 1.5·p99 → 1)."""
        if self.window_s <= 0:
            return 0.0
        ok = self.requests - self.failures
        if self.ok_latencies_ms:
            within = int(np.searchsorted(np.asarray(self.ok_latencies_ms), slo_ms, side="right"))
            return within / self.window_s
        p50, p95, p99 = self._percentiles()
        if not math.isfinite(p99):
            return 0.0
        share = float(np.interp(slo_ms, [0.0, p50, p95, p99, 1.5 * p99], [0.0, 0.5, 0.95, 0.99, 1.0]))
        return ok * share / self.window_s

    def _percentiles(self) -> tuple[float, float, float]:
        corrected = (self.latency_p50_corrected_ms, self.latency_p95_corrected_ms,
                     self.latency_p99_corrected_ms)
        if all(math.isfinite(v) for v in corrected):
            return corrected
        return self.latency_p50_ms, self.latency_p95_ms, self.latency_p99_ms
