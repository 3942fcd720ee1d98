"""What one load run measured over its window."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadResult:
    """Client-side figures over the measurement window only (warm-up excluded).

    Latency percentiles are over successful requests, in milliseconds with sub-millisecond
    resolution; failed requests count in ``error_rate`` so a config that rejects traffic fast
    never looks good.
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

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 1.0

    @property
    def throughput_ratio(self) -> float:
        """Achieved over offered load; below 1 means the config (or the machine) could not keep up."""
        return self.achieved_rps / self.offered_rps if self.offered_rps else 0.0
