"""The Kubernetes target: Istio on a staging cluster, one namespace, one Deployment, one DestinationRule.

A trial merge-patches the DestinationRule's managed ``trafficPolicy`` fields and, when route
settings are tuned, the VirtualService's ``retries`` (both reach the sidecars by xDS, no restart),
and the Deployment's managed pod-template annotations (a rolling restart, only when they change),
waits like ``kubectl rollout status``, and reads the sidecars' CPU use over the measurement window
from Prometheus, scoped to the new ReplicaSet's ``pod-template-hash``. A scenario's service faults
are misbehaving replicas of the service's backend (``_faults``), created and removed around it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.mesh import MeshConfig, destination_rule, http_retries, virtual_service
from autotune.spec import (
    EndpointFault,
    KubernetesTargetSpec,
    PrometheusSpec,
    SearchParam,
    ServiceRef,
    SidecarResources,
    Timing,
)
from autotune.targets._base import Observed, ProxyUsage, StateStore, Target
from autotune.targets.kubernetes._client import (
    DR_GROUP,
    DR_PLURAL,
    VS_PLURAL,
    ApiCallFailed,
    KubeApi,
    make_api_client,
)
from autotune.targets.kubernetes._desired import (
    VS_PARAMETERS,
    annotation_patch,
    desired_annotations,
    desired_traffic_policy,
    with_retries,
)
from autotune.targets.kubernetes._faults import FAULT_LABEL, FaultReplicas
from autotune.targets.kubernetes._observe import observe
from autotune.targets.kubernetes._propagation import (
    IN_CLUSTER_ADMIN_URL,
    check_reachable,
    expected_thresholds,
    wait_propagated,
)
from autotune.targets.kubernetes._rollout import wait_for_rollout
from autotune.targets.kubernetes._snapshot import (
    STATE_KEY,
    Snapshot,
    managed_annotations,
    merge_patch,
    traffic_policy_of,
)

logger = logging.getLogger(__name__)

STAGING_LABEL = "autotune.io/staging"
MANAGED_BY = {"app.kubernetes.io/managed-by": "autotune"}


class MetricsReader(Protocol):
    """What the target needs from ``autotune.metrics.PrometheusReader``."""

    def check(self) -> None: ...
    def wait_until_scraped(self, namespace: str, deployment: str, pod_template_hash: str | None,
                           end: float) -> None: ...
    def sidecar_cpu_cores(self, namespace: str, deployment: str, pod_template_hash: str | None,
                          start: float, end: float) -> float: ...
    def throttled_ratio(self, namespace: str, deployment: str, pod_template_hash: str | None,
                        start: float, end: float) -> float | None: ...
    def server_latency_ms(self, namespace: str, deployment: str, quantile: float,
                          start: float, end: float) -> float: ...


@dataclass(frozen=True)
class PrometheusUsage(ProxyUsage):
    """Usage read from Prometheus, where throttling comes as a ratio rather than period counts."""

    measured_throttled_ratio: float | None = None

    @property
    def throttled_ratio(self) -> float:
        return self.measured_throttled_ratio or 0.0


def _default_reader(spec: PrometheusSpec) -> MetricsReader:
    from autotune.metrics import PrometheusReader

    return PrometheusReader(spec)


class KubernetesTarget(Target):
    """Tunes one Deployment's client sidecars and one DestinationRule in a staging namespace.

    Touches nothing outside ``spec.namespace``. The baseline (DR ``trafficPolicy``, managed
    annotations; the VirtualService before autotune first writes it) is snapshotted and kept in
    the bound ``StateStore`` until ``close`` has restored it, so a crashed run is repaired by the
    next ``start``; misbehaving replicas a crashed run left are found by their label and removed
    by ``start``. ``service_faults``: the spec's scenarios have faults (``start`` then checks what
    they need). Not thread-safe. ``api_client`` and ``metrics`` exist for tests; normally both
    come from the spec.
    """

    name = "kubernetes"

    supports_service_faults = True

    def __init__(self, spec: KubernetesTargetSpec, service: ServiceRef, sidecar: SidecarResources, *,
                 api_client: Any = None, metrics: MetricsReader | None = None, timing: Timing | None = None,
                 service_faults: bool = False) -> None:
        self.spec, self.service, self.sidecar = spec, service, sidecar
        self.timing = timing or Timing()
        self.service_faults = service_faults
        #: The misbehaving replicas of the service's backend (scenario faults).
        self.fault_replicas = FaultReplicas(
            spec.service_deployment or service.name, service.name, dict(MANAGED_BY),
            rollout_timeout_s=self.timing.rollout_timeout, poll_s=spec.poll_interval,
            settle_s=self.timing.xds_push)
        self._tuned: frozenset[str] = frozenset()
        self._vs_changed = False
        self._api_client, self._metrics = api_client, metrics
        self._api: KubeApi | None = None
        self._store: StateStore | None = None
        self._snapshot: Snapshot | None = None
        self._rollout_generation: int | None = None
        self._dr_changed = False
        self._pod_hash: str | None = None
        self._window_start: float | None = None
        self._applied: MeshConfig | None = None
        #: The client sidecar's admin URL (``spec.sidecarAdminUrl``; localhost in-cluster), if any.
        self.sidecar_admin_url: str | None = (
            spec.sidecar_admin_url if spec.sidecar_admin_url is not None
            else IN_CLUSTER_ADMIN_URL if spec.in_cluster else None) or None
        self._started = False
        self._closed = False

    def bind_state(self, store: StateStore) -> None:
        self._store = store

    def check_supported(self, space: list[SearchParam]) -> None:
        """Every parameter is applied here (DestinationRule, VirtualService, pod template); the
        space is remembered: its DestinationRule fields are managed (a config that leaves one out
        removes it), and ``start`` checks the VirtualService RBAC when route settings are tuned."""
        self._tuned = frozenset(p.name for p in space)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Pre-flight (namespace labelled for staging, Deployment, DestinationRule API and no
        port-level connection pool for the service's port, RBAC, Prometheus, the client sidecar's
        admin), then snapshot the baseline, or restore the one a crashed run left behind."""
        if self._closed:
            raise TargetError("this kubernetes target was closed; create a new one")
        if self._started:
            return
        try:
            api = self._connect()
            deployment, dr = self._preflight(api)
            if self._metrics is None:
                self._metrics = _default_reader(self.spec.prometheus)
            self._metrics.check()
            if self.sidecar_admin_url is not None:
                check_reachable(self.sidecar_admin_url, self.spec.request_timeout)
            left = self.fault_replicas.remove(api)
            if left:
                logger.warning("removed the misbehaving replicas a previous run left: %s", ", ".join(left))
            self._take_snapshot(deployment, dr)
            self._pod_hash = self._find_pod_hash(api, api.get_deployment(self.spec.deployment))
        except ApiCallFailed as exc:
            self._release()
            raise TargetError(exc.describe()) from None
        except TrialFailed as exc:
            self._release()
            raise TargetError(f"could not put back the baseline a previous run left: {exc}") from None
        except BaseException:
            self._release()
            raise
        self._started = True
        logger.info("kubernetes target ready: deployment %s/%s, destinationrule %s, load to %s",
                 self.spec.namespace, self.spec.deployment, self.spec.destination_rule, self.load_url)

    def _connect(self) -> KubeApi:
        if self._api is None:
            raw = self._api_client if self._api_client is not None else make_api_client(self.spec)
            self._api = KubeApi(raw, self.spec.namespace, self.spec.request_timeout)
        return self._api

    def _preflight(self, api: KubeApi) -> tuple[dict[str, Any], dict[str, Any] | None]:
        ns = self.spec.namespace
        try:
            namespace = api.get_namespace()
        except ApiCallFailed as exc:
            if exc.status == 404:
                raise TargetError(f"namespace {ns} does not exist in this cluster") from None
            raise
        labels = (namespace.get("metadata") or {}).get("labels") or {}
        if labels.get(STAGING_LABEL) != "true":
            raise TargetError(
                f'namespace {ns} is not labelled {STAGING_LABEL}: "true"; autotune only changes '
                f"namespaces marked as staging. If it is one, run: "
                f"kubectl label namespace {ns} {STAGING_LABEL}=true")
        try:
            deployment = api.get_deployment(self.spec.deployment)
        except ApiCallFailed as exc:
            if exc.status == 404:
                raise TargetError(f"deployment {self.spec.deployment} not found in namespace {ns}") from None
            raise
        dr = self._get_dr(api, start=True)
        self._check_port_level(dr)
        self._check_rbac(api, dr_exists=dr is not None)
        if self.service_faults:
            self.fault_replicas.preflight(api)
        return deployment, dr

    def _get_dr(self, api: KubeApi, start: bool = False) -> dict[str, Any] | None:
        try:
            return api.get_destination_rule(self.spec.destination_rule)
        except ApiCallFailed as exc:
            if exc.is_status_not_found:
                return None
            if exc.status == 404:
                msg = (f"the API server does not serve {DR_PLURAL}.{DR_GROUP}/v1 (404 for the API group): "
                       "Istio's CRDs are not installed in this cluster, or predate Istio 1.22 (v1)")
                raise (TargetError(msg) if start else TrialFailed(FailReason.API, msg)) from None
            raise

    def _check_port_level(self, dr: dict[str, Any] | None) -> None:
        """Refuse a DestinationRule whose ``portLevelSettings`` give the service's port its own
        ``connectionPool``: Istio then uses that block instead of the top-level one autotune tunes
        (``GetPortLevelTrafficPolicy``), so the tuned values would have no effect."""
        policy = ((dr or {}).get("spec") or {}).get("trafficPolicy") or {}
        port = self.service.port
        for i, entry in enumerate(policy.get("portLevelSettings") or []):
            if ((entry.get("port") or {}).get("number") == port and entry.get("connectionPool")):
                raise TargetError(
                    f"destinationrule {self.spec.destination_rule}: spec.trafficPolicy.portLevelSettings[{i}] "
                    f"sets a connectionPool for port {port}, the service's port. Istio uses it instead of "
                    "spec.trafficPolicy.connectionPool, which autotune tunes, so the tuned values would "
                    "have no effect. Move those connectionPool values to spec.trafficPolicy.connectionPool "
                    f"and remove connectionPool from portLevelSettings[{i}], or point autotune at a "
                    "DestinationRule without a port-level pool for this port")

    def _check_rbac(self, api: KubeApi, dr_exists: bool) -> None:
        needed = [("get", "deployments", "apps"), ("patch", "deployments", "apps"), ("list", "deployments", "apps"),
                  ("list", "pods", ""), ("get", DR_PLURAL, DR_GROUP), ("patch", DR_PLURAL, DR_GROUP)]
        if not dr_exists:
            needed += [("create", DR_PLURAL, DR_GROUP), ("delete", DR_PLURAL, DR_GROUP)]
        if self.service_faults:
            needed += [("create", "deployments", "apps"), ("delete", "deployments", "apps"),
                       ("get", "services", "")]
        if self._tuned & VS_PARAMETERS:
            needed += [(verb, VS_PLURAL, DR_GROUP) for verb in ("get", "create", "patch", "delete")]
        missing = []
        for verb, resource, group in needed:
            allowed = api.can_i(verb, resource, group)
            if allowed is None:
                logger.debug("SelfSubjectAccessReview unavailable; RBAC is checked by the calls themselves")
                return
            if not allowed:
                missing.append(f"verb {verb!r} on {resource!r} (API group {group!r})")
        if missing:
            raise TargetError(f"RBAC in namespace {self.spec.namespace} does not allow: "
                              + "; ".join(missing) + " (see cluster/ for the Role autotune needs)")

    def _take_snapshot(self, deployment: dict[str, Any], dr: dict[str, Any] | None) -> None:
        stored = self._store.get(STATE_KEY) if self._store is not None else None
        if stored:
            try:
                snap = Snapshot.from_json(stored)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TargetError(
                    f"the study's saved baseline (study user attribute 'target.{STATE_KEY}') cannot be "
                    f"read ({type(exc).__name__}: {exc}); restore the namespace by hand from that "
                    "attribute, then delete it (or use another study name)") from None
            here = (self.spec.namespace, self.spec.deployment, self.spec.destination_rule)
            if (snap.namespace, snap.deployment, snap.destination_rule) != here:
                raise TargetError(f"the study holds a baseline for {snap.namespace}/{snap.deployment} "
                                  f"(destinationrule {snap.destination_rule}), not {'/'.join(here[:2])}; "
                                  "use another study name")
            logger.warning("a previous run did not restore %s/%s; putting back the baseline it recorded",
                        snap.namespace, snap.deployment)
            self._snapshot = snap
            self._restore_to(snap)
            return
        self._snapshot = Snapshot.read(self.spec.namespace, deployment, self.spec.destination_rule, dr)
        if self._store is not None:
            self._store.set(STATE_KEY, self._snapshot.to_json())

    # -- a trial -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _trial_errors(self) -> Iterator[None]:
        try:
            yield
        except ApiCallFailed as exc:
            reason = (FailReason.REJECTED if exc.status in (400, 422)
                      else FailReason.API_TIMEOUT if exc.status == 0 else FailReason.API)
            raise TrialFailed(reason, exc.describe()) from None

    def _retry_conflict(self, step: Any) -> None:
        try:
            step()
        except ApiCallFailed as exc:
            if exc.status != 409:
                raise
            logger.info("conflict (%s); reading again and retrying once", exc.server_message)
            step()

    def apply(self, config: MeshConfig) -> None:
        """Merge-patch the DestinationRule (create it if absent), the VirtualService when route
        settings are tuned (create it if absent) and, only if they change, the managed
        pod-template annotations. Raises ``TrialFailed(FailReason.REJECTED, server message)`` when
        the API server refuses the config, ``TrialFailed(FailReason.API, …)`` on other API errors."""
        api = self._require_started()
        with self._trial_errors():
            self._retry_conflict(lambda: self._apply_dr(api, config))
            self._retry_conflict(lambda: self._apply_vs(api, config))
            self._retry_conflict(lambda: self._apply_annotations(api, config))
        self._applied = config
        logger.debug("applied %s", config.describe())

    def _apply_dr(self, api: KubeApi, config: MeshConfig) -> None:
        dr = self._get_dr(api)
        current = traffic_policy_of(dr)
        desired = desired_traffic_policy(current, config, self._tuned)
        if dr is None:
            if desired is None:
                return
            body = destination_rule(config, self.service)
            body["metadata"].update(name=self.spec.destination_rule, namespace=self.spec.namespace,
                                    labels=dict(MANAGED_BY))
            body["spec"]["host"] = self.spec.host
            api.create_destination_rule(body)
            self._dr_changed = True
            return
        patch = merge_patch(current, desired)
        if patch != {}:
            api.patch_destination_rule(self.spec.destination_rule, {"spec": {"trafficPolicy": patch}})
            self._dr_changed = True

    # -- the VirtualService (route settings) -----------------------------------------------------

    @property
    def _vs_name(self) -> str:
        return self.spec.virtual_service or self.service.name

    def _get_vs(self, api: KubeApi) -> dict[str, Any] | None:
        try:
            return api.get_custom(VS_PLURAL, self._vs_name)
        except ApiCallFailed as exc:
            if exc.is_status_not_found:
                return None
            raise

    def _snapshot_vs(self, api: KubeApi) -> Snapshot:
        """The snapshot, with the VirtualService as it was before autotune's first write to it."""
        snap = self._snapshot
        assert snap is not None
        if snap.virtual_service is None:
            vs = self._get_vs(api)
            snap = replace(snap, virtual_service=self._vs_name,
                           vs_spec=(vs or {}).get("spec") if vs is not None else None)
            self._snapshot = snap
            if self._store is not None:
                self._store.set(STATE_KEY, snap.to_json())
        return snap

    def _apply_vs(self, api: KubeApi, config: MeshConfig) -> None:
        """Route settings on every HTTP route of the VirtualService; it is created for the host
        when absent, and deleted again when autotune created it and a config tunes no route setting."""
        snap = self._snapshot
        assert snap is not None
        if not (self._tuned & VS_PARAMETERS or config.tunes("virtualservice") or snap.virtual_service):
            return
        snap = self._snapshot_vs(api)
        retries = http_retries(config)
        vs, name = self._get_vs(api), self._vs_name
        if vs is None:
            if retries is not None:
                api.create_custom(VS_PLURAL, self._new_vs(config))
                self._vs_changed = True
            return
        if retries is None and snap.vs_spec is None and _managed_by_us(vs):
            api.delete_custom(VS_PLURAL, name)
            self._vs_changed = True
            return
        spec = vs.get("spec") or {}
        if not spec.get("http"):
            raise TrialFailed(FailReason.REJECTED, f"virtualservice {name} has no http routes to put the "
                              "tuned retries on; point target.virtualService at the one routing the service")
        desired = with_retries(spec, retries)
        if desired != spec:
            api.patch_custom(VS_PLURAL, name, {"metadata": {"resourceVersion": vs["metadata"]["resourceVersion"]},
                                               "spec": {"http": desired["http"]}})
            self._vs_changed = True

    def _new_vs(self, config: MeshConfig) -> dict[str, Any]:
        body = virtual_service(config, self.service)
        assert body is not None
        body["metadata"].update(name=self._vs_name, namespace=self.spec.namespace, labels=dict(MANAGED_BY))
        body["spec"]["hosts"] = [self.spec.host]
        for route in body["spec"]["http"]:
            for dest in route["route"]:
                dest["destination"]["host"] = self.spec.host
        return body

    def _restore_vs(self, api: KubeApi, snap: Snapshot) -> None:
        if snap.virtual_service is None:
            return  # never written
        vs, name = self._get_vs(api), snap.virtual_service
        if vs is None:
            if snap.vs_spec is not None:
                logger.warning("virtualservice %s was deleted by someone else; not recreating it", name)
            return
        if snap.vs_spec is None:
            if _managed_by_us(vs):
                api.delete_custom(VS_PLURAL, name)
            else:
                logger.warning("virtualservice %s was created by someone else; leaving it", name)
            return
        patch = merge_patch(vs.get("spec") or {}, snap.vs_spec)
        if patch != {}:
            api.patch_custom(VS_PLURAL, name, {"spec": patch})

    # -- scenario faults -------------------------------------------------------------------------

    def set_service_faults(self, faults: Sequence[EndpointFault]) -> None:
        """Misbehaving replicas of the service's backend (``_faults``): ``faults`` replaces the
        ones in force and returns once they are rolled out and ``timing.xdsPush`` has passed;
        ``()`` removes them and returns once their pods are gone. ``TrialFailed`` on API errors,
        a failed rollout or a timeout (``timing.rolloutTimeout``)."""
        api = self._require_started()
        with self._trial_errors():
            self.fault_replicas.put(api, faults)

    def _apply_annotations(self, api: KubeApi, config: MeshConfig) -> None:
        assert self._snapshot is not None
        dep = api.get_deployment(self.spec.deployment)
        desired = desired_annotations(config, self.sidecar, self._snapshot.annotations)
        patch = annotation_patch(managed_annotations(dep), desired)
        if patch:
            self._patch_annotations(api, patch)

    def _patch_annotations(self, api: KubeApi, patch: dict[str, str | None]) -> None:
        answer = api.patch_deployment(self.spec.deployment,
                                      {"spec": {"template": {"metadata": {"annotations": patch}}}})
        self._rollout_generation = int(answer["metadata"]["generation"])
        self._pod_hash = None

    def wait_ready(self, timeout_s: float) -> None:
        """After a pod-template change, wait for the rollout like ``kubectl rollout status`` for
        at most ``min(timeout_s, timing.rollout_timeout)``. Then, with a sidecar admin URL, poll
        the client sidecar until it runs the applied circuit breakers, for at most
        ``timing.xds_push``; without one, sleep ``timing.xds_push`` after a DestinationRule change
        (not cut short by ``timeout_s``).

        Raises ``TrialFailed(FailReason.ROLLOUT_FAILED, condition message)`` at once on ``ReplicaFailure``
        or ``ProgressDeadlineExceeded``, ``TrialFailed(FailReason.NOT_READY, …)`` on timeout,
        ``TrialFailed(FailReason.NOT_PROPAGATED, …)`` if the sidecar does not converge in time.
        """
        api = self._require_started()
        with self._trial_errors():
            if self._rollout_generation is not None:
                self._wait_rollout(api, self._rollout_generation, min(timeout_s, self.timing.rollout_timeout))
            if self.sidecar_admin_url is not None and self._applied is not None:
                took = wait_propagated(self.sidecar_admin_url, self._cluster_name(),
                                       expected_thresholds(self._applied, self.service),
                                       self.timing.xds_push, self.spec.poll_interval)
                logger.debug("the client sidecar ran the applied config after %.2f s", took)
            if self._vs_changed or (self.sidecar_admin_url is None and self._dr_changed):
                time.sleep(self.timing.xds_push)  # the propagation check covers the circuit breakers only
            self._dr_changed = self._vs_changed = False
            if self._pod_hash is None:
                self._pod_hash = self._find_pod_hash(api, api.get_deployment(self.spec.deployment))

    def _cluster_name(self) -> str:
        """Istio's outbound cluster for the DestinationRule's host on the service's port."""
        return f"outbound|{self.service.port}||{self.spec.host}"

    def _wait_rollout(self, api: KubeApi, generation: int, timeout_s: float) -> None:
        wait_for_rollout(lambda: api.get_deployment(self.spec.deployment), generation,
                         timeout_s, self.spec.poll_interval)
        self._rollout_generation = None
        self._pod_hash = None

    def _find_pod_hash(self, api: KubeApi, dep: dict[str, Any]) -> str | None:
        """The ``pod-template-hash`` of the Deployment's non-terminating pods (the new ReplicaSet)."""
        selector = _own_pods(dep)
        pods = [p for p in api.list_pods(selector) if not (p.get("metadata") or {}).get("deletionTimestamp")]
        hashes = Counter(((p.get("metadata") or {}).get("labels") or {}).get("pod-template-hash") for p in pods)
        hashes.pop(None, None)
        if not hashes:
            logger.warning("no running pod of deployment %s carries a pod-template-hash; CPU is read for "
                        "all its pods", self.spec.deployment)
            return None
        if len(hashes) > 1:
            logger.warning("pods of several ReplicaSets are running (%s); scoping CPU to the largest",
                        dict(hashes))
        return hashes.most_common(1)[0][0]

    @property
    def load_url(self) -> str:
        """``spec.serviceUrl``: the only address load is sent to (``TargetError`` before start)."""
        self._require_started()
        return self.spec.service_url.rstrip("/")

    # -- measurement ---------------------------------------------------------------------------

    @property
    def end_window_wait_s(self) -> float:
        """``end_window`` waits for Prometheus to scrape past the window: one scrape interval plus 1 s."""
        return self.spec.prometheus.scrape_interval + 1.0

    def begin_window(self) -> None:
        """Mark the window's start (again, if one is open)."""
        self._require_started()
        self._window_start = time.time()

    def end_window(self) -> ProxyUsage:
        """The sidecars' CPU over exactly [begin, end] from Prometheus (cAdvisor). Blocks until
        Prometheus has scraped past the window's end: at most ``prometheus.scrapeInterval`` + 1 s."""
        self._require_started()
        if self._window_start is None or self._metrics is None:
            raise TargetError("end_window called without begin_window")
        start, end = self._window_start, time.time()
        self._window_start = None
        self._metrics.wait_until_scraped(self.spec.namespace, self.spec.deployment, self._pod_hash, end)
        args = (self.spec.namespace, self.spec.deployment, self._pod_hash, start, end)
        cpu = self._metrics.sidecar_cpu_cores(*args)
        throttled = self._metrics.throttled_ratio(*args)
        extra: dict[str, float] = {}
        if self.spec.prometheus.server_latency:
            for q in (0.95, 0.99):
                extra[f"server_latency_p{round(q * 100)}_ms"] = self._metrics.server_latency_ms(
                    self.spec.namespace, self.spec.deployment, q, start, end)
        return PrometheusUsage(cpu_cores=cpu, window_s=end - start, measured_throttled_ratio=throttled,
                               extra=extra)

    def observed(self) -> Observed:
        """Read back from the API server: the stored DestinationRule's ``trafficPolicy`` and the
        annotations and ``istio-proxy`` CPU limit of the RUNNING pods of the current ReplicaSet
        (not the pod template), so a config that was never rolled out shows as such."""
        api = self._require_started()
        with self._trial_errors():
            policy = traffic_policy_of(self._get_dr(api))
            dep = api.get_deployment(self.spec.deployment)
            pods = api.list_pods(_own_pods(dep))
        return observe(policy, pods, self._pod_hash)

    # -- restore and close ---------------------------------------------------------------------

    def restore(self) -> None:
        """Remove the misbehaving replicas (waiting until their pods are gone), put the snapshot
        back and wait for the rollout if the annotations changed; a no-op before start, after
        close, or when the baseline is in force. Raises ``TargetError``."""
        if not self._started or self._closed or self._snapshot is None:
            return
        try:
            self.fault_replicas.remove(self._connect())
            self._restore_to(self._snapshot)
        except ApiCallFailed as exc:
            raise TargetError(f"could not restore the baseline: {exc.describe()}") from None
        except TrialFailed as exc:
            raise TargetError(f"the baseline did not roll out again: {exc}") from None

    def _restore_to(self, snap: Snapshot) -> None:
        api = self._connect()
        self._retry_conflict(lambda: self._restore_dr(api, snap))
        self._retry_conflict(lambda: self._restore_vs(api, snap))
        self._retry_conflict(lambda: self._restore_annotations(api, snap))
        if self._rollout_generation is not None:
            self._wait_rollout(api, self._rollout_generation, self.timing.rollout_timeout)
        self._dr_changed = self._vs_changed = False
        self._applied = None

    def _restore_dr(self, api: KubeApi, snap: Snapshot) -> None:
        dr = self._get_dr(api)
        name = self.spec.destination_rule
        if dr is None:
            if snap.dr_exists:
                logger.warning("destinationrule %s was deleted by someone else; not recreating it", name)
            return
        if not snap.dr_exists:
            if _managed_by_us(dr):
                api.delete_destination_rule(name)
            else:
                logger.warning("destinationrule %s was created by someone else; leaving it", name)
            return
        patch = merge_patch(traffic_policy_of(dr), snap.traffic_policy)
        if patch != {}:
            api.patch_destination_rule(name, {"spec": {"trafficPolicy": patch}})

    def _restore_annotations(self, api: KubeApi, snap: Snapshot) -> None:
        current = managed_annotations(api.get_deployment(self.spec.deployment))
        patch = {k: v for k, v in snap.annotations.items() if current.get(k) != v}
        if patch:
            self._patch_annotations(api, patch)

    def close(self) -> None:
        """Restore the baseline, then forget the snapshot kept in the study. Idempotent. If the
        restore fails the snapshot stays in the study (the next start retries) and this raises."""
        if self._closed:
            return
        failure: TargetError | None = None
        if self._started:
            try:
                self.restore()
            except TargetError as exc:
                failure = exc
                logger.error("%s; the snapshot stays in the study and the next start restores it", exc)
            else:
                if self._store is not None:
                    self._store.set(STATE_KEY, None)
        self._closed = True
        self._started = False
        self._release()
        if failure is not None:
            raise failure

    def _release(self) -> None:
        api, self._api = self._api, None
        if api is not None:
            with contextlib.suppress(Exception):
                api.close()

    def _require_started(self) -> KubeApi:
        if not self._started or self._closed or self._api is None:
            raise TargetError("the kubernetes target is not running (call start first)")
        return self._api


def _managed_by_us(obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in MANAGED_BY.items())


def _own_pods(dep: dict[str, Any]) -> str:
    """The Deployment's pods without the misbehaving copies of it (whose labels its selector
    also matches)."""
    return ",".join(filter(None, (_label_selector(((dep.get("spec") or {}).get("selector")) or {}),
                                  f"!{FAULT_LABEL}")))


def _label_selector(selector: dict[str, Any]) -> str:
    """A Deployment's ``spec.selector`` as a ``labelSelector`` query string."""
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)
