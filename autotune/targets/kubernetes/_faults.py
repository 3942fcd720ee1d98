"""A scenario's service faults on a cluster: misbehaving replicas of the service's backend.

Istio's VirtualService ``fault`` acts in the client before an endpoint is chosen (never retried,
never ejected: reference §1f), so a bad endpoint among healthy ones is modelled as it happens:
a second Deployment of the same app, behind the same Service, told to misbehave. For each fault
of a scenario the target creates ``<deployment>-fault-<i>`` in the staging namespace: the service
Deployment's pod template (its labels, which the Service selects, plus the marker label
``autotune.io/fault-replica``), ``replicas`` = the fault's ``endpoints``, and on every container
the environment variables below. The app must honour them; autotune cannot make an image it does
not know misbehave. The staging demo's backend (autotune's image running the local target's
endpoint, ``autotune.targets.local._upstream``) reads them.

The copy has no readiness, liveness or startup probe: a replica that fails its readiness probe
leaves the Service's endpoints and stops being the bad endpoint the scenario is about (a replica
that passes its probes and fails requests is what outlier detection exists for).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.spec import EndpointFault
from autotune.targets.kubernetes._client import ApiCallFailed, KubeApi
from autotune.targets.kubernetes._rollout import wait_for_rollout
from autotune.targets.local._upstream import FAULT_ENV

logger = logging.getLogger(__name__)

#: The marker label on the copies and their pods (value: the fault's index in the scenario).
FAULT_LABEL = "autotune.io/fault-replica"
#: Which Deployment a copy was made from (on the copy's own metadata).
SOURCE_LABEL = "autotune.io/fault-of"
#: The environment contract, one variable per ``EndpointFault`` field, written on every container;
#: the same names the local service's endpoint (``autotune.targets.local._upstream``, also the
#: staging demo's backend) reads.
ENV_DELAY_MS = FAULT_ENV["delay_ms"]
ENV_SERVICE_TIME_FACTOR = FAULT_ENV["service_time_factor"]
ENV_ERROR_RATE = FAULT_ENV["error_rate"]
ENV_RESET_RATE = FAULT_ENV["reset_rate"]
ENV_REFUSE_CONNECTIONS = FAULT_ENV["refuse_connections"]
_PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


def fault_env(fault: EndpointFault) -> list[dict[str, str]]:
    """The environment one misbehaving replica runs with: every request takes
    ``AUTOTUNE_FAULT_DELAY_MS`` more and its service time times
    ``AUTOTUNE_FAULT_SERVICE_TIME_FACTOR``; a share ``AUTOTUNE_FAULT_ERROR_RATE`` is answered
    503 and a share ``AUTOTUNE_FAULT_RESET_RATE`` has its connection reset before any response;
    with ``AUTOTUNE_FAULT_REFUSE_CONNECTIONS=true`` it refuses every connection."""
    return [{"name": ENV_DELAY_MS, "value": f"{fault.delay_ms:g}"},
            {"name": ENV_SERVICE_TIME_FACTOR, "value": f"{fault.service_time_factor:g}"},
            {"name": ENV_ERROR_RATE, "value": f"{fault.error_rate:g}"},
            {"name": ENV_RESET_RATE, "value": f"{fault.reset_rate:g}"},
            {"name": ENV_REFUSE_CONNECTIONS, "value": "true" if fault.refuse_connections else "false"}]


def fault_name(source: str, index: int) -> str:
    return f"{source}-fault-{index}"


def fault_deployment(source: dict[str, Any], fault: EndpointFault, index: int,
                     labels: dict[str, str]) -> dict[str, Any]:
    """The Deployment body of fault ``index`` of a scenario, copied from ``source`` (the service
    Deployment as read from the API); ``labels`` go on its own metadata (who manages it)."""
    name = source["metadata"]["name"]
    spec = source.get("spec") or {}
    template = copy.deepcopy(spec.get("template") or {})
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), FAULT_LABEL: str(index), SOURCE_LABEL: name}
    pod = template.setdefault("spec", {})
    env = fault_env(fault)
    ours = {e["name"] for e in env}
    for container in pod.get("containers") or []:
        for probe in _PROBES:
            container.pop(probe, None)
        container["env"] = [e for e in container.get("env") or [] if e.get("name") not in ours] + env
    selector = copy.deepcopy(spec.get("selector") or {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), FAULT_LABEL: str(index)}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": fault_name(name, index),
                     "labels": {**labels, FAULT_LABEL: str(index), SOURCE_LABEL: name}},
        "spec": {"replicas": fault.endpoints, "selector": selector, "template": template},
    }


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a Service's ``spec.selector`` (equality only) selects pods with ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class FaultReplicas:
    """The misbehaving replicas of one service Deployment (``source``) behind Service
    ``service``, in the namespace of the ``KubeApi`` each call gets.

    ``put`` replaces whatever copies exist by the ones a scenario's faults ask for and returns once
    each is rolled out (``kubectl rollout status``) and ``settle_s`` has passed for the Service's
    endpoints to reach the client sidecars; ``remove`` deletes every copy of ``source`` (found by
    label, so a crashed run's too) and returns once their pods are gone. API errors propagate as
    ``ApiCallFailed``; a rollout that fails or times out raises ``TrialFailed``.
    """

    def __init__(self, source: str, service: str, labels: dict[str, str], *, rollout_timeout_s: float,
                 poll_s: float, settle_s: float) -> None:
        self.source, self.service, self.labels = source, service, labels
        self.rollout_timeout_s, self.poll_s, self.settle_s = rollout_timeout_s, poll_s, settle_s

    @property
    def selector(self) -> str:
        """Label selector of the copies and their pods."""
        return f"{SOURCE_LABEL}={self.source}"

    def preflight(self, api: KubeApi) -> None:
        """``TargetError`` unless the source Deployment exists and the Service selects its pods
        (else a copy would get no traffic and the scenario would measure a healthy service)."""
        try:
            source = api.get_deployment(self.source)
        except ApiCallFailed as exc:
            if exc.status == 404:
                raise TargetError(
                    f"deployment {self.source} (the service's backend, which scenario faults copy) not found "
                    f"in namespace {api.namespace}; set target.serviceDeployment to the Deployment behind "
                    f"service {self.service}") from None
            raise
        try:
            service = api.get_service(self.service)
        except ApiCallFailed as exc:
            if exc.status == 404:
                raise TargetError(f"service {self.service} (service.name) not found in namespace "
                                  f"{api.namespace}; scenario faults add replicas behind it") from None
            raise
        selector = (service.get("spec") or {}).get("selector") or {}
        labels = (((source.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector_matches(selector, labels):
            raise TargetError(
                f"service {self.service}'s selector {selector} does not select the pods of deployment "
                f"{self.source} (labels {labels}): a misbehaving copy of it would get no traffic. Set "
                "target.serviceDeployment to the Deployment behind the service")

    def put(self, api: KubeApi, faults: Sequence[EndpointFault]) -> list[str]:
        """Replace the copies by one per fault; the names created."""
        self.remove(api)
        if not faults:
            return []
        source = api.get_deployment(self.source)
        created = []
        for i, fault in enumerate(faults):
            body = fault_deployment(source, fault, i, self.labels)
            answer = api.create_deployment(body)
            name = body["metadata"]["name"]
            created.append(name)
            logger.info("created misbehaving replica(s) %s: %d pod(s), %s", name, fault.endpoints,
                        fault.model_dump(by_alias=True, exclude_defaults=True))
            generation = int((answer.get("metadata") or {}).get("generation") or 1)
            wait_for_rollout(functools.partial(api.get_deployment, name), generation,
                             self.rollout_timeout_s, self.poll_s)
        time.sleep(self.settle_s)
        return created

    def remove(self, api: KubeApi) -> list[str]:
        """Delete every copy of the source and wait until their pods are gone; the names deleted."""
        names = [d["metadata"]["name"] for d in api.list_deployments(self.selector)]
        for name in names:
            try:
                api.delete_deployment(name)
            except ApiCallFailed as exc:
                if not exc.is_status_not_found:
                    raise
        if names:
            self._wait_pods_gone(api)
            logger.info("removed misbehaving replica(s) %s", ", ".join(names))
        return names

    def _wait_pods_gone(self, api: KubeApi) -> None:
        deadline = time.monotonic() + self.rollout_timeout_s
        while True:
            left = [p["metadata"]["name"] for p in api.list_pods(self.selector)]
            if not left:
                time.sleep(self.settle_s)
                return
            if time.monotonic() >= deadline:
                raise TrialFailed(FailReason.NOT_READY, f"the pods of the misbehaving replicas of {self.source} "
                                  f"were not gone {self.rollout_timeout_s:.0f}s after their deletion: "
                                  + ", ".join(sorted(left)))
            time.sleep(self.poll_s)
