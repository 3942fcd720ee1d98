"""Envoy's own counters for the service's cluster, read from the admin ``/stats``.

The local Envoy names its cluster's stats like an Istio sidecar does (``alt_stat_name`` = the
cluster name + ``;``), so a counter reads ``cluster.outbound|8080||backend.demo.svc.cluster.local;.
upstream_rq_pending_overflow``; in Prometheus format (Istio's ``cluster_name`` tag) it is
``envoy_cluster_upstream_rq_pending_overflow{cluster_name="outbound|8080||…"}``.
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.parse

from autotune.errors import TargetError
from autotune.targets.local._envoy import EnvoyProcess

logger = logging.getLogger(__name__)

#: Envoy cluster counter → the metric name its per-window delta gets (stable, snake-case).
ENVOY_COUNTERS: dict[str, str] = {
    "upstream_rq_total": "envoy_upstream_rq",
    "upstream_rq_pending_total": "envoy_pending",
    "upstream_rq_pending_overflow": "envoy_pending_overflow",
    "upstream_cx_overflow": "envoy_cx_overflow",
    "upstream_rq_retry": "envoy_retries",
    "upstream_rq_retry_success": "envoy_retry_success",
    "upstream_rq_retry_overflow": "envoy_retry_overflow",
    "outlier_detection.ejections_enforced_total": "envoy_ejections",
    "outlier_detection.ejections_overflow": "envoy_ejections_overflow",
    "upstream_rq_503": "envoy_upstream_503",
    "upstream_rq_5xx": "envoy_upstream_5xx",
    "upstream_cx_destroy_remote_with_active_rq": "envoy_upstream_resets",
    "upstream_cx_connect_fail": "envoy_connect_failures",
    "upstream_rq_timeout": "envoy_timeouts",
    "upstream_rq_per_try_timeout": "envoy_per_try_timeouts",
    "upstream_cx_total": "envoy_upstream_cx",
    "upstream_cx_connect_timeout": "envoy_connect_timeouts",
}


def read_counters(envoy: EnvoyProcess, cluster: str) -> dict[str, int]:
    """The ``ENVOY_COUNTERS`` of ``cluster`` now, by Envoy's names (a counter Envoy has not
    created, e.g. outlier detection's without an outlier detector, reads 0).

    Raises ``TargetError`` if the admin endpoint cannot be read.
    """
    pattern = rf"^cluster\.{re.escape(cluster)};?\."
    try:
        text = envoy.admin_get("/stats?filter=" + urllib.parse.quote(pattern, safe=""))
    except (OSError, urllib.error.URLError) as exc:
        raise TargetError(f"cannot read envoy's /stats: {exc}") from exc
    values = dict.fromkeys(ENVOY_COUNTERS, 0)
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if not sep:
            continue
        short = re.sub(pattern, "", name)
        if short in values:
            try:
                values[short] = int(value)
            except ValueError:
                continue
    return values


def deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Per-window increase of each counter, by metric name (``ENVOY_COUNTERS`` values)."""
    return {metric: float(after.get(name, 0) - before.get(name, 0))
            for name, metric in ENVOY_COUNTERS.items()}
