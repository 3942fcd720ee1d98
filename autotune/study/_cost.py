"""The cost axis of a config, named for what each figure is (issue 11 item 6)."""

from __future__ import annotations

import math

from autotune.mesh import MeshConfig

#: The new cost metric names; ``cpu_cores`` and ``cpu_reserved_cores`` are their deprecated aliases.
COST_METRICS = ("cpu_used_cores", "cpu_requested_cores", "cpu_limit_cores", "cpu_per_1k_rps")


def cost_metrics(config: MeshConfig, cpu_used: float, achieved_rps: float,
                 request_default: float) -> dict[str, float]:
    """CPU used (measured), requested (what the scheduler reserves and a cluster pays for), the
    limit (with no limit: the node's CPUs, what the proxy may use), and CPU used per 1,000
    achieved requests/s (NaN when nothing was served). ``request_default`` is the spec's
    ``sidecar.cpuRequest`` in cores."""
    return {
        "cpu_used_cores": cpu_used,
        "cpu_requested_cores": config.request_cores(request_default),
        "cpu_limit_cores": config.effective_cpu_limit,
        "cpu_per_1k_rps": 1000.0 * cpu_used / achieved_rps if achieved_rps > 0 else math.nan,
    }
