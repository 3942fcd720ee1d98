"""When a Deployment's rollout is complete: ``kubectl rollout status``, plus failing fast.

Reproduces kubectl's ``DeploymentStatusViewer.Status`` (``pkg/polymorphichelpers/rollout_status.go``)
on the Deployment JSON, starting from the generation the PATCH returned so that an early poll cannot
see the previous rollout's "done". Unlike kubectl it also stops at a ``ReplicaFailure`` condition
(e.g. the sidecar injector refusing a bad annotation), which would otherwise only surface when
``progressDeadlineSeconds`` (600 s by default) runs out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from autotune.errors import FailReason, TrialFailed

TIMED_OUT_REASON = "ProgressDeadlineExceeded"


class RolloutFailed(Exception):
    """The Deployment reports that this rollout cannot finish."""


def rollout_state(dep: dict[str, Any], min_generation: int = 0) -> tuple[bool, str]:
    """``(done, why)`` for a Deployment as returned by the API. Raises ``RolloutFailed``.

    Zero-valued status fields are omitted in JSON, hence the ``.get(…, 0)``.
    """
    meta, spec, st = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    generation = max(int(meta.get("generation", 0)), min_generation)
    if generation > int(st.get("observedGeneration", 0)):
        return False, "waiting for the deployment spec update to be observed"
    for c in st.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == TIMED_OUT_REASON:
            raise RolloutFailed(f"deployment {meta.get('name')} exceeded its progress deadline: "
                                f"{c.get('message', '')}")
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            raise RolloutFailed(f"replica failure: {c.get('reason')}: {c.get('message', '')}")
    if spec.get("paused"):
        return False, "the deployment is paused (spec.paused) and will not roll out"
    want, updated = spec.get("replicas"), int(st.get("updatedReplicas", 0))
    if want is not None and updated < int(want):
        return False, f"{updated} of {want} new replicas updated"
    replicas = int(st.get("replicas", 0))
    if replicas > updated:
        return False, f"{replicas - updated} old replicas pending termination"
    available = int(st.get("availableReplicas", 0))
    if available < updated:
        return False, f"{available} of {updated} updated replicas available"
    return True, "successfully rolled out"


def wait_for_rollout(read: Callable[[], dict[str, Any]], min_generation: int, timeout_s: float,
                     poll_s: float) -> dict[str, Any]:
    """Poll ``read`` until the rollout of ``min_generation`` (or later) is done; return the last read.

    Raises ``TrialFailed(FailReason.ROLLOUT_FAILED, condition message)`` at once on ``ReplicaFailure`` or
    ``ProgressDeadlineExceeded``, ``TrialFailed(FailReason.NOT_READY, last state)`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        dep = read()
        try:
            done, why = rollout_state(dep, min_generation)
        except RolloutFailed as exc:
            raise TrialFailed(FailReason.ROLLOUT_FAILED, str(exc)) from None
        if done:
            return dep
        if time.monotonic() >= deadline:
            name = (dep.get("metadata") or {}).get("name")
            raise TrialFailed(FailReason.NOT_READY, f"deployment {name} did not finish rolling out generation "
                              f"{min_generation} within {timeout_s:.0f}s ({why})")
        time.sleep(poll_s)
