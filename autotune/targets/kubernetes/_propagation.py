"""Did the client sidecar get the cluster config? Its Envoy admin (``/clusters?format=json``)
shows the circuit breakers it enforces for the service's outbound cluster; they are compared with
the thresholds Istio writes for the applied config (``mesh.envoy_cluster``)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.mesh import MeshConfig, ServiceRef, envoy_cluster

logger = logging.getLogger(__name__)

#: The client sidecar's admin port inside the pod (istio-proxy, ``localhost:15000``).
IN_CLUSTER_ADMIN_URL = "http://127.0.0.1:15000"
_THRESHOLDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def expected_thresholds(config: MeshConfig, service: ServiceRef) -> dict[str, int]:
    """The DEFAULT-priority circuit breakers Istio writes for ``config`` (unset = 4294967295)."""
    threshold = envoy_cluster(config, service, [])["circuit_breakers"]["thresholds"][0]
    return {k: int(threshold[k]) for k in _THRESHOLDS}


def sidecar_thresholds(admin_url: str, cluster: str, timeout_s: float = 5.0) -> dict[str, int] | None:
    """The DEFAULT-priority thresholds the sidecar runs for ``cluster``; ``None`` if it has no
    such cluster. Raises ``OSError``/``ValueError`` when the admin endpoint cannot be read."""
    with _NO_PROXY.open(admin_url.rstrip("/") + "/clusters?format=json", timeout=timeout_s) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    for status in body.get("cluster_statuses", []):
        if status.get("name") != cluster:
            continue
        for t in (status.get("circuit_breakers") or {}).get("thresholds", []):
            if t.get("priority", "DEFAULT") == "DEFAULT":
                return {k: int(t[k]) for k in _THRESHOLDS if k in t}
        return {}
    return None


def check_reachable(admin_url: str, timeout_s: float) -> None:
    """Pre-flight: ``TargetError`` saying what to do if the admin endpoint does not answer."""
    try:
        sidecar_thresholds(admin_url, "", timeout_s)
    except (OSError, ValueError) as exc:
        raise TargetError(
            f"the client sidecar's admin endpoint {admin_url} does not answer ({exc}); autotune reads "
            "it to check that each DestinationRule change reached the sidecar. Run autotune in a pod "
            "with an istio-proxy sidecar, set target.sidecarAdminUrl to its admin URL, or set it to "
            '"" to wait a fixed timing.xdsPush instead') from None


def wait_propagated(admin_url: str, cluster: str, want: dict[str, int], bound_s: float,
                    poll_s: float) -> float:
    """Poll the sidecar until ``cluster``'s thresholds equal ``want``; returns the seconds it
    took. Checked at least once, then until ``bound_s`` has passed:
    ``TrialFailed(FailReason.NOT_PROPAGATED, …)`` with what it runs instead."""
    t0 = time.monotonic()
    while True:
        try:
            have = sidecar_thresholds(admin_url, cluster)
            if have is None:
                last = f"the sidecar has no cluster {cluster!r}"
            else:
                diffs = [f"{k}: {have.get(k)} != {v}" for k, v in want.items() if have.get(k) != v]
                if not diffs:
                    return time.monotonic() - t0
                last = "running != applied: " + "; ".join(diffs)
        except (OSError, ValueError) as exc:
            last = f"cannot read {admin_url}: {exc}"
        if time.monotonic() - t0 >= bound_s:
            raise TrialFailed(FailReason.NOT_PROPAGATED,
                              f"the client sidecar did not get the applied config of {cluster} within "
                              f"{bound_s:g}s (timing.xdsPush): {last}")
        time.sleep(min(poll_s, max(0.0, bound_s - (time.monotonic() - t0))) or 0.01)
