"""A stateful fake Kubernetes API server that the real ``kubernetes`` client talks to over HTTP.

It serves what the Kubernetes target uses, with the API server's semantics where they matter:
namespaces (labels); Services (GET; their ``selector`` picks the endpoints the backend serves from);
``apps/v1`` Deployments (GET, LIST by label selector; POST validated against the Kubernetes 1.35
schema, strictly, with the selector required to match the template's labels; DELETE, after which
the pods terminate for two more pod listings; PATCH with merge-patch or strategic-merge-patch,
``null`` deleting a key; ``metadata.generation`` bumped only on a spec change; a rollout that
progresses one step per GET after a pod-template change or a creation, and switches to make it
fail or hang); pods listed by label selector (``k=v``, ``k!=v``, ``k``, ``!k``), named
``<deployment>-<pod-template-hash>-<n>``; ``networking.istio.io/v1`` DestinationRules and
VirtualServices (GET/POST/PATCH/DELETE, validation against the real Istio 1.30.3 CRD schemas and
their CEL rules, ``fieldValidation=Strict`` refusing unknown fields, Istio's webhook refusing
negative values, 409 on a stale ``resourceVersion`` or an existing name);
SelfSubjectAccessReviews; RBAC: per-(verb, resource) 403s, or a Role's rules (``use_role``)
enforced on every request; injected errors and delays; and a log of every request.

Status codes are the real server's: unknown fields under Strict → 400 (``strict decoding error``),
schema violations → 422 (``Invalid``), a webhook denial → 400, a group that is not served → 404 with
a plain-text body (not a ``Status``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import celpy  # PyPI cel-python (a dev dependency): the CRD's CEL rules, as the API server runs them
import jsonschema
import kubernetes_validate
import yaml

from _crd import VS_CRD, load_crd, strict_dr_schema, strict_vs_schema
from autotune.mesh import ServiceRef, envoy_cluster, parse_cpu, parse_memory
from autotune.targets.kubernetes._faults import (
    ENV_DELAY_MS,
    ENV_ERROR_RATE,
    ENV_RESET_RATE,
    ENV_SERVICE_TIME_FACTOR,
)
from autotune.targets.kubernetes._observe import pool_of

DR_PREFIX = "/apis/networking.istio.io/v1/namespaces/"
_HASH_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' SafeEncodeString alphabet


@dataclass
class Request:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


@dataclass
class Fault:
    status: int
    message: str
    times: int
    reason: str = ""


#: Cumulative share of requests per histogram bucket of the fake sidecars (p95 = 17.5 ms).
SERVER_LATENCY_BUCKETS = (("1", 0.0), ("5", 0.5), ("10", 0.9), ("25", 1.0), ("+Inf", 1.0))


K8S_VERSION = "1.35.0"
#: The kinds the fake serves from Istio's CRDs: plural → (kind, CRD file).
ISTIO_KINDS = {"destinationrules": "DestinationRule", "virtualservices": "VirtualService"}


def _crd_schema(kind: str) -> dict[str, Any]:
    crd = load_crd() if kind == "DestinationRule" else load_crd(VS_CRD)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _strict_schema(kind: str = "DestinationRule") -> dict[str, Any]:
    """What ``fieldValidation=Strict`` enforces instead of pruning (see tests/_crd.py)."""
    return strict_dr_schema("v1") if kind == "DestinationRule" else strict_vs_schema("v1")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also what a strategic merge patch does to a string map)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def template_hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(_HASH_CHARS[b % len(_HASH_CHARS)] for b in digest[:10])


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up is expected in tests


class HttpError(Exception):
    def __init__(self, code: int, body: Any) -> None:
        super().__init__(code)
        self.code, self.body = code, body


@dataclass
class Rollout:
    """The status sequence one pod-template change goes through, one step per Deployment GET."""

    generation: int
    old_hash: str | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    completes: bool = True
    position: int = 0


class FakeCluster:
    """State plus the HTTP server. Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.namespaces: dict[str, dict[str, str]] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.drs: dict[tuple[str, str], dict[str, Any]] = {}
        self.vss: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        #: Deleted Deployments whose pods still terminate: key → (deployment, pod listings left).
        self.deleted: dict[tuple[str, str], tuple[dict[str, Any], int]] = {}
        #: ``use_role``: the Role's rules, enforced on every request (``None``: all allowed).
        self.role_rules: list[dict[str, Any]] | None = None
        self.rollouts: dict[tuple[str, str], Rollout] = {}
        self.terminating: dict[tuple[str, str], str] = {}  # old hash whose pods are terminating
        self.requests: list[Request] = []
        #: Seeded draws of the misbehaving replicas, and the faulty answers each endpoint gave.
        self.rng = random.Random(11)
        self.fault_replies: dict[str, int] = {}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource)
        self.faults: dict[tuple[str, str], Fault] = {}
        self.delay_s: dict[tuple[str, str], float] = {}
        self.istio_installed = True
        #: ``None``, ``"ReplicaFailure"``, ``"ProgressDeadlineExceeded"`` or ``"hang"``: what the next
        #: rollouts do after their first step.
        self.rollout_mode: str | None = None
        self.rollout_message = ('pods "web-x" is forbidden: admission webhook "sidecar-injector.istio.io" '
                                'denied the request: invalid proxyCPULimit')
        #: What each pod's istio-proxy container uses, as cAdvisor reports it on /metrics/cadvisor:
        #: a steady rate, plus ``proxy_cpu_per_request`` CPU-seconds per request the backend
        #: serves (shared by the pods running then), plus the bursts of ``add_proxy_cpu``.
        self.proxy_cpu_cores = 0.05
        #: When set, a pod's istio-proxy rate instead of ``proxy_cpu_cores`` (from the pod as created).
        self.proxy_cpu_of: Callable[[dict[str, Any]], float] | None = None
        self.proxy_cpu_per_request = 0.0
        self.proxy_throttled_ratio = 0.1
        self._pod_seen: dict[str, float] = {}
        self._proxy_extra: dict[str, float] = {}
        self._bursts: list[tuple[float, float]] = []
        #: pod-template-hash → the template its pods were created from (their annotations).
        self.templates: dict[str, dict[str, Any]] = {}
        #: The client sidecar's admin (``/sidecar/<ns>/clusters?format=json``) shows the stored
        #: DestinationRules' circuit breakers ``sidecar_delay_s`` after each write; after
        #: ``freeze_sidecar()`` it keeps what it had then (an xDS push that never arrives).
        self.sidecar_delay_s = 0.0
        self.sidecar_service_port = 8080
        self._sidecar_frozen_at: float | None = None
        self._dr_history: dict[tuple[str, str], list[tuple[float, dict[str, Any] | None]]] = {}
        self._rv = 1000
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cluster = self

        class Handler(_Handler):
            fake = cluster

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-k8s", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, context: str = "fake") -> Path:
        """Write a kubeconfig whose context ``context`` points at this server."""
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": context,
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "autotune", "user": {"token": "fake-token"}}],
               "contexts": [{"name": context, "context": {"cluster": "fake", "user": "autotune"}}]}
        path.write_text(yaml.safe_dump(doc))
        return path

    def reset(self) -> None:
        """Forget every object, switch and logged request (pods' CPU counters keep running)."""
        with self.lock:
            for store in (self.namespaces, self.deployments, self.drs, self.rollouts, self.terminating,
                          self.faults, self.delay_s, self.vss, self.services, self.deleted):
                store.clear()  # type: ignore[attr-defined]
            self.role_rules = None
            self.forbidden.clear()
            self.requests.clear()
            self.templates.clear()
            self.fault_replies.clear()
            self.rng = random.Random(11)
            self.istio_installed = True
            self.rollout_mode = None
            self.sidecar_delay_s = 0.0
            self._sidecar_frozen_at = None
            self._dr_history.clear()

    # -- seeding and inspection -------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        with self.lock:
            self.namespaces[name] = dict(labels or {})

    def add_deployment(self, ns: str, name: str, replicas: int = 2,
                       annotations: dict[str, str] | None = None) -> dict[str, Any]:
        labels = {"app": name}
        dep = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "generation": 1, "resourceVersion": self._next_rv(),
                         "uid": f"uid-{name}", "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations or {})},
                                  "spec": {"containers": [{"name": name, "image": "example/app:1"}]}}},
        }
        dep["status"] = self._done_status(dep)
        with self.lock:
            self.deployments[(ns, name)] = dep
            self._remember_template(dep)
        return copy.deepcopy(dep)

    def add_service(self, ns: str, name: str, selector: dict[str, str], port: int = 8080) -> None:
        with self.lock:
            self.services[(ns, name)] = {
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": self._next_rv()},
                "spec": {"selector": dict(selector), "ports": [{"name": "http", "port": port}]}}

    def use_role(self, *roles: dict[str, Any]) -> None:
        """Allow only what ``roles`` (``rbac.authorization.k8s.io/v1`` Roles or ClusterRoles bound
        to autotune) grant, as the API server's RBAC authorizer does, on requests and on access
        reviews."""
        with self.lock:
            self.role_rules = [copy.deepcopy(rule) for role in roles for rule in role["rules"]]

    def allowed(self, verb: str, resource: str, group: str, name: str | None) -> bool:
        if (verb, resource) in self.forbidden:
            return False
        if self.role_rules is None:
            return True
        return any(group in r.get("apiGroups", []) and resource in r.get("resources", [])
                   and verb in r.get("verbs", []) and (not r.get("resourceNames") or name in r["resourceNames"])
                   for r in self.role_rules)

    def endpoints(self, ns: str, service: str) -> list[dict[str, Any]]:
        """The running pods the Service selects (its ready endpoints), in a stable order."""
        with self.lock:
            svc = self.services.get((ns, service))
            if svc is None:
                return []
            selector = svc["spec"]["selector"]
            return sorted((p for p in self._pods(ns, consume=False) if "deletionTimestamp" not in p["metadata"]
                           and selector.items() <= p["metadata"]["labels"].items()),
                          key=lambda p: str(p["metadata"]["name"]))

    def vs(self, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.vss.get((ns, name))
            return copy.deepcopy(found) if found else None

    def add_virtual_service(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        with self.lock:
            self.vss[(ns, name)] = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                                    "metadata": {"name": name, "namespace": ns, "generation": 1,
                                                 "resourceVersion": self._next_rv()},
                                    "spec": copy.deepcopy(spec)}

    def add_destination_rule(self, ns: str, name: str, host: str,
                             traffic_policy: dict[str, Any] | None = None) -> None:
        spec: dict[str, Any] = {"host": host}
        if traffic_policy is not None:
            spec["trafficPolicy"] = copy.deepcopy(traffic_policy)
        with self.lock:
            self.drs[(ns, name)] = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                                    "metadata": {"name": name, "namespace": ns, "generation": 1,
                                                 "resourceVersion": self._next_rv()},
                                    "spec": spec}
            self._dr_stored(ns, name)

    def _dr_stored(self, ns: str, name: str) -> None:
        """Called under the lock after each write of a DestinationRule (``None``: deleted)."""
        found = self.drs.get((ns, name))
        self._dr_history.setdefault((ns, name), []).append((time.monotonic(), copy.deepcopy(found)))

    def freeze_sidecar(self) -> None:
        """From now on the client sidecar keeps the config it has (no xDS push arrives)."""
        with self.lock:
            self._sidecar_frozen_at = time.monotonic()

    def sidecar_clusters(self, ns: str) -> dict[str, Any]:
        """Envoy's ``/clusters?format=json`` as the client sidecar would answer it: one outbound
        cluster per DestinationRule of ``ns`` that the sidecar has received."""
        with self.lock:
            now = time.monotonic() - self.sidecar_delay_s
            if self._sidecar_frozen_at is not None:
                now = min(now, self._sidecar_frozen_at)
            statuses = []
            for (dns, _), history in self._dr_history.items():
                seen = [dr for t, dr in history if t <= now and dns == ns]
                if not seen or seen[-1] is None:
                    continue
                dr = seen[-1]
                host = dr["spec"]["host"]
                service = ServiceRef(name=host.split(".")[0], namespace=ns, port=self.sidecar_service_port,
                                     host=host)
                cluster = envoy_cluster(pool_of(dr["spec"].get("trafficPolicy")), service, [])
                statuses.append({"name": cluster["name"], "circuit_breakers": cluster["circuit_breakers"]})
        return {"cluster_statuses": statuses}

    def deployment(self, ns: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.deployments[(ns, name)])

    def annotations(self, ns: str, name: str) -> dict[str, str]:
        return dict(self.deployment(ns, name)["spec"]["template"]["metadata"].get("annotations") or {})

    def dr(self, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.drs.get((ns, name))
            return copy.deepcopy(found) if found else None

    def calls(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def fail(self, verb: str, resource: str, status: int, message: str, times: int = 1, reason: str = "") -> None:
        """Answer the next ``times`` requests of (verb, resource) with ``status`` and ``message``."""
        with self.lock:
            self.faults[(verb, resource)] = Fault(status, message, times, reason)

    def _remember_template(self, dep: dict[str, Any]) -> None:
        tpl = dep["spec"]["template"]
        self.templates.setdefault(template_hash(tpl), copy.deepcopy(tpl))

    def add_proxy_cpu(self, at: float, seconds: float) -> None:
        """From wall-clock time ``at`` on, every istio-proxy counter is ``seconds`` higher (a burst)."""
        with self.lock:
            self._bursts.append((at, seconds))

    def serve_request(self, ns: str, pod: str | None = None) -> None:
        """Charge one request's sidecar CPU to ``pod`` (the endpoint that served it), else to the
        pods of ``ns`` running now (the backend calls it)."""
        with self.lock:
            pods = [pod] if pod is not None else [p["metadata"]["name"] for p in self._pods(ns, consume=False)
                                                  if "deletionTimestamp" not in p["metadata"]]
            for name in pods:
                self._proxy_extra[name] = self._proxy_extra.get(name, 0.0) + self.proxy_cpu_per_request / len(pods)

    def running_pods(self, ns: str) -> list[dict[str, Any]]:
        """The pods of ``ns`` that are not terminating (as a listing would show them now)."""
        with self.lock:
            return [p for p in self._pods(ns, consume=False) if "deletionTimestamp" not in p["metadata"]]

    def cadvisor(self) -> str:
        """A kubelet's ``/metrics/cadvisor`` for the pods that exist now: the istio-proxy and app
        containers' CPU counters grow at fixed rates from when a pod first appeared."""
        now = time.time()
        lines = ["# TYPE container_cpu_usage_seconds_total counter",
                 "# TYPE istio_request_duration_milliseconds histogram",
                 "# TYPE container_cpu_cfs_periods_total counter",
                 "# TYPE container_cpu_cfs_throttled_periods_total counter"]
        with self.lock:
            pods = [p for ns in list(self.namespaces) for p in self._pods(ns, consume=False)]
            for pod in pods:
                meta = pod["metadata"]
                seen = self._pod_seen.setdefault(meta["name"], now)
                age = now - seen
                extra = self._proxy_extra.get(meta["name"], 0.0) + sum(
                    s for t, s in self._bursts if seen <= t <= now)
                proxy = self.proxy_cpu_of(pod) if self.proxy_cpu_of is not None else self.proxy_cpu_cores
                for container, cores in (("istio-proxy", proxy), (meta["name"].split("-")[0], 0.5)):
                    labels = f'namespace="{meta["namespace"]}",pod="{meta["name"]}",container="{container}"'
                    used = cores * age + (extra if container == "istio-proxy" else 0.0)
                    lines.append(f"container_cpu_usage_seconds_total{{{labels}}} {used:.6f}")
                    lines.append(f"container_cpu_cfs_periods_total{{{labels}}} {int(age * 10)}")
                    throttled = int(age * 10 * self.proxy_throttled_ratio) if container == "istio-proxy" else 0
                    lines.append(f"container_cpu_cfs_throttled_periods_total{{{labels}}} {throttled}")
                # Istio's server-side histogram: 100 requests/s per pod, p95 = 17.5 ms exactly
                # (95th of 100 falls halfway into the (10, 25] bucket, which holds 90..100).
                workload = meta["name"].rsplit("-", 2)[0]
                labels = (f'reporter="destination",destination_workload_namespace="{meta["namespace"]}",'
                          f'destination_workload="{workload}",pod="{meta["name"]}"')
                for le, share in SERVER_LATENCY_BUCKETS:
                    lines.append(f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}} '
                                 f"{100 * share * age:.3f}")
        return "\n".join(lines) + "\n"

    # -- deployment status -----------------------------------------------------------------------

    @staticmethod
    def _done_status(dep: dict[str, Any]) -> dict[str, Any]:
        n = dep["spec"]["replicas"]
        return {"observedGeneration": dep["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
                "readyReplicas": n, "availableReplicas": n,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                               {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}

    def _start_rollout(self, key: tuple[str, str], dep: dict[str, Any], old_hash: str) -> None:
        n, gen = dep["spec"]["replicas"], dep["metadata"]["generation"]
        old_status = copy.deepcopy(dep["status"])
        progressing = [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                       {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]
        steps = [
            old_status,  # the controller has not seen the new generation yet
            {"observedGeneration": gen, "replicas": n + 1, "updatedReplicas": 1, "availableReplicas": n,
             "conditions": progressing},
        ]
        mode = self.rollout_mode
        invalid = _pod_invalid(f"{key[1]}-{template_hash(dep['spec']['template'])}-x",
                               _injected(dep["spec"]["template"]))
        if invalid:
            mode = "ReplicaFailure"
        if mode == "ReplicaFailure":
            failed = copy.deepcopy(steps[-1])
            failed["conditions"].append({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                         "message": invalid or self.rollout_message})
            steps.append(failed)
        elif mode == "ProgressDeadlineExceeded":
            failed = copy.deepcopy(steps[-1])
            failed["conditions"][1] = {"type": "Progressing", "status": "False",
                                       "reason": "ProgressDeadlineExceeded",
                                       "message": f'ReplicaSet "{key[1]}-x" has timed out progressing.'}
            steps.append(failed)
        elif mode != "hang":
            steps += [
                {"observedGeneration": gen, "replicas": n + 1, "updatedReplicas": n, "availableReplicas": n,
                 "conditions": progressing},  # old replicas pending termination
                {"observedGeneration": gen, "replicas": n, "updatedReplicas": n, "availableReplicas": n - 1,
                 "conditions": progressing},  # updated replicas not yet available
                self._done_status(dep),
            ]
        self.rollouts[key] = Rollout(gen, old_hash, steps, completes=mode is None)

    def _advance(self, key: tuple[str, str]) -> None:
        ro = self.rollouts.get(key)
        if ro is None:
            return
        dep = self.deployments[key]
        dep["status"] = copy.deepcopy(ro.steps[min(ro.position, len(ro.steps) - 1)])
        ro.position += 1
        if ro.position >= len(ro.steps) and ro.completes:
            del self.rollouts[key]
            if ro.old_hash:
                self.terminating[key] = ro.old_hash  # old pods terminate for one more pod listing

    def _pods(self, ns: str, consume: bool = True) -> list[dict[str, Any]]:
        """The pods of ``ns``; a listing (``consume``) ends the terminating phase of old pods."""
        pods = []
        for (dns, name), dep in self.deployments.items():
            if dns != ns:
                continue
            tpl = dep["spec"]["template"]
            new_hash = template_hash(tpl)
            ro = self.rollouts.get((dns, name))
            status = dep.get("status") or {}
            groups: list[tuple[str, int, bool]] = []
            if ro is not None:
                # Until the controller observes the new generation, no pod of it exists yet.
                seen = int(status.get("observedGeneration", 0)) >= ro.generation
                updated = int(status.get("updatedReplicas", 0)) if seen else 0
                groups.append((new_hash, updated, False))
                old = int(status.get("replicas", 0)) - updated
                if ro.old_hash and old > 0:
                    groups.append((ro.old_hash, old, False))
            else:
                groups.append((new_hash, dep["spec"]["replicas"], False))
                if (dns, name) in self.terminating:
                    old_hash = self.terminating.pop((dns, name)) if consume else self.terminating[(dns, name)]
                    groups.append((old_hash, dep["spec"]["replicas"], True))
            pods += self._pods_of(ns, name, tpl, groups)
        for (dns, name), (dep, left) in list(self.deleted.items()):
            if dns != ns:
                continue
            if consume:
                if left <= 1:
                    del self.deleted[(dns, name)]
                else:
                    self.deleted[(dns, name)] = (dep, left - 1)
            tpl = dep["spec"]["template"]
            pods += self._pods_of(ns, name, tpl, [(template_hash(tpl), dep["spec"]["replicas"], True)])
        return pods

    def _pods_of(self, ns: str, name: str, tpl: dict[str, Any],
                 groups: list[tuple[str, int, bool]]) -> list[dict[str, Any]]:
        pods = []
        for h, count, terminating in groups:
            created_from = self.templates.get(h, tpl)
            for i in range(count):
                meta: dict[str, Any] = {"name": f"{name}-{h}-{i:05d}"[:63], "namespace": ns,
                                        "labels": {**created_from["metadata"].get("labels", {}),
                                                   "pod-template-hash": h},
                                        "annotations": dict(created_from["metadata"].get("annotations") or {})}
                if terminating:
                    meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                             "spec": _injected(created_from), "status": {"phase": "Running"}})
        return pods

    def _created(self, key: tuple[str, str], dep: dict[str, Any]) -> None:
        """A new Deployment's rollout: not observed yet, pods created, not yet available, done."""
        n = dep["spec"]["replicas"]
        dep["status"] = {}
        steps = [{}, {"observedGeneration": 1, "replicas": n, "updatedReplicas": n, "availableReplicas": 0,
                      "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetCreated"}]},
                 self._done_status(dep)]
        self.rollouts[key] = Rollout(1, None, steps)


def _injected(template: dict[str, Any]) -> dict[str, Any]:
    """The pod spec after Istio's sidecar injector: the template's containers plus ``istio-proxy``
    with the resources the ``sidecar.istio.io/proxy*`` annotations ask for (the chart's defaults
    100m/2000m CPU, 128Mi/1024Mi memory otherwise)."""
    ann = template["metadata"].get("annotations") or {}
    names = {("requests", "cpu"): "sidecar.istio.io/proxyCPU", ("requests", "memory"): "sidecar.istio.io/proxyMemory",
             ("limits", "cpu"): "sidecar.istio.io/proxyCPULimit",
             ("limits", "memory"): "sidecar.istio.io/proxyMemoryLimit"}
    chart = {("requests", "cpu"): "100m", ("requests", "memory"): "128Mi", ("limits", "cpu"): "2000m",
             ("limits", "memory"): "1024Mi"}
    # All or nothing (reference §1c): one annotation present and the chart's defaults are ignored.
    annotated = any(a in ann for a in names.values())
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    for (kind, res), annotation in names.items():
        value = ann.get(annotation) if annotated else chart[(kind, res)]
        if value is not None:
            resources[kind][res] = value
    sidecar = {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.3", "resources": resources}
    return {"containers": [*copy.deepcopy(template["spec"]["containers"]), sidecar]}


def _pod_invalid(name: str, spec: dict[str, Any]) -> str:
    """The API server's pod validation of requests against limits (what the ReplicaSet controller
    reports as ``FailedCreate``), ``""`` when the pod is valid."""
    for i, container in enumerate(spec["containers"]):
        res = container.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for kind, parse in (("cpu", parse_cpu), ("memory", parse_memory)):
            req, lim = requests.get(kind), limits.get(kind)
            if req is not None and lim is not None and parse(req) > parse(lim):
                return (f'Pod "{name}" is invalid: spec.containers[{i}].resources.requests: Invalid value: '
                        f'"{req}": must be less than or equal to {kind} limit of {lim}')
    return ""


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for part in filter(None, (p.strip() for p in selector.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in part:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            if labels.get(k) != v:
                return False
        elif part.startswith("!"):
            if part[1:] in labels:
                return False
        elif labels.get(part) is None:
            return False
    return True


def _negative_ints(node: Any, path: str = "spec") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _negative_ints(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _negative_ints(v, f"{path}[{i}]")
    elif isinstance(node, int) and not isinstance(node, bool) and node < 0:
        out.append(f"{path}: must be >= 0, got {node}")
    return out


@functools.cache
def _cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """The CRD's ``x-kubernetes-validations`` (CEL) that ``value`` breaks, as the API server words
    them."""
    if value is None:
        return []
    out = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if not _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}):
            shown = f'"{value}"' if isinstance(value, str) else f'"{type(value).__name__}"'
            out.append(f"{path}: Invalid value: {shown}: {rule.get('message') or 'failed rule: ' + rule['rule']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                out += _cel_errors(sub, value[key], f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                out += _cel_errors(extra, item, f"{path}[{key}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += _cel_errors(schema["items"], item, f"{path}[{i}]")
    return out


def _validate_deployment(dep: dict[str, Any], strict: bool) -> None:
    """The API server's checks on a new Deployment: the Kubernetes 1.35 schema (unknown fields
    refused under Strict), a selector that matches the template's labels, label values."""
    name = dep.get("metadata", {}).get("name", "")
    try:
        kubernetes_validate.validate(dep, K8S_VERSION, strict=strict)
    except kubernetes_validate.ValidationError as exc:
        raise HttpError(400 if "Additional properties" in str(exc) else 422,
                        _status(422, "Invalid", f'Deployment.apps "{name}" is invalid: {exc}')) from None
    spec = dep["spec"]
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    problems = []
    if not selector.items() <= labels.items():
        problems.append(f"spec.template.metadata.labels: Invalid value: {labels}: `selector` does not match "
                        "template `labels`")
    for where, found in (("metadata.labels", dep["metadata"].get("labels") or {}),
                         ("spec.template.metadata.labels", labels)):
        problems += [f"{where}: Invalid value: {v!r}: must be no more than 63 characters"
                     for v in found.values() if len(str(v)) > 63]
    if problems:
        raise HttpError(422, _status(422, "Invalid", f'Deployment.apps "{name}" is invalid: ' + "; ".join(problems),
                                     {"name": name, "group": "apps", "kind": "Deployment"}))


def _validate_istio(kind: str, obj: dict[str, Any], strict: bool) -> None:
    """What the API server (the CRD's schema and CEL rules, Strict field validation) and Istio's
    validating webhook refuse, with their status codes and wording."""
    name = obj.get("metadata", {}).get("name", "")
    if strict:
        for err in jsonschema.Draft7Validator(_strict_schema(kind)).iter_errors({"spec": obj.get("spec")}):
            if err.validator == "additionalProperties":
                path = ".".join(str(p) for p in err.absolute_path)
                raise HttpError(400, _status(400, "BadRequest", f"{kind} in version \"v1\" cannot be "
                                             f"handled as a {kind}: strict decoding error: "
                                             f"{err.message} at {path}"))
    schema = _crd_schema(kind)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors({"spec": obj.get("spec")}))
    if errors:
        causes = [".".join(str(p) for p in e.absolute_path) + ": " + e.message for e in errors]
        raise HttpError(422, _status(422, "Invalid", f'{kind}.networking.istio.io "{name}" is invalid: '
                                     + "; ".join(causes),
                                     {"name": name, "group": "networking.istio.io", "kind": kind}))
    broken = _cel_errors(schema["properties"]["spec"], obj.get("spec"), "spec")
    if broken:
        raise HttpError(422, _status(422, "Invalid", f'{kind}.networking.istio.io "{name}" is invalid: '
                                     + ", ".join(broken),
                                     {"name": name, "group": "networking.istio.io", "kind": kind}))
    negative = _negative_ints(obj.get("spec"))
    if negative:
        raise HttpError(400, _status(400, "BadRequest", 'admission webhook "validation.istio.io" denied the '
                                     "request: configuration is invalid: " + "; ".join(negative)))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeCluster
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed ACK

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: Any, ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/metrics/cadvisor":
            self._send(200, self.fake.cadvisor(), "text/plain; version=0.0.4; charset=utf-8")
            return
        sidecar = parts.path.strip("/").split("/")
        if sidecar[0] == "sidecar" and len(sidecar) == 3 and sidecar[2] == "clusters":
            self._send(200, self.fake.sidecar_clusters(sidecar[1]))
            return
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        ctype = self.headers.get("Content-Type", "")
        fake = self.fake
        with fake.lock:
            fake.requests.append(Request(self.command, parts.path, query, ctype, body))
        try:
            code, answer = self._route(parts.path, query, ctype, body)
        except HttpError as exc:
            code, answer = exc.code, exc.body
        self._send(code, answer)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

    def _guard(self, verb: str, resource: str, group: str, ns: str, name: str | None) -> None:
        fake = self.fake
        delay = fake.delay_s.get((verb, resource))
        if delay:
            time.sleep(delay)
        with fake.lock:
            fault = fake.faults.get((verb, resource))
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del fake.faults[(verb, resource)]
                reason = fault.reason or {401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                                          409: "Conflict", 422: "Invalid"}.get(fault.status, "InternalError")
                raise HttpError(fault.status, _status(fault.status, reason, fault.message))
            if not fake.allowed(verb, resource, group, name):
                what = f'{resource}{"." + group if group else ""} "{name}" ' if name else f"{resource} "
                raise HttpError(403, _status(403, "Forbidden", f'{what}is forbidden: User '
                                             f'"system:serviceaccount:{ns}:autotune" cannot {verb} resource '
                                             f'"{resource}" in API group "{group}" in the namespace "{ns}"'))

    def _route(self, path: str, query: dict[str, str], ctype: str, body: Any) -> tuple[int, Any]:
        p = path.strip("/").split("/")
        verb = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[self.command]
        if p[:3] == ["apis", "authorization.k8s.io", "v1"] and p[3:] == ["selfsubjectaccessreviews"]:
            self._check_patch_type(ctype, ("application/json",))
            attrs = body["spec"]["resourceAttributes"]
            allowed = self.fake.allowed(attrs["verb"], attrs["resource"], attrs.get("group", ""), attrs.get("name"))
            return 201, {**body, "status": {"allowed": allowed}}
        if p[:3] == ["api", "v1", "namespaces"] and len(p) == 4 and verb == "get":
            self._guard("get", "namespaces", "", p[3], p[3])
            return self._namespace(p[3])
        if p[:3] == ["api", "v1", "namespaces"] and len(p) == 5 and p[4] == "pods" and verb == "get":
            self._guard("list", "pods", "", p[3], None)
            with self.fake.lock:
                pods = [x for x in self.fake._pods(p[3])
                        if _selector_matches(query.get("labelSelector", ""), x["metadata"]["labels"])]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}
        if p[:3] == ["api", "v1", "namespaces"] and len(p) == 6 and p[4] == "services" and verb == "get":
            self._guard("get", "services", "", p[3], p[5])
            with self.fake.lock:
                svc = self.fake.services.get((p[3], p[5]))
                if svc is None:
                    return 404, _status(404, "NotFound", f'services "{p[5]}" not found',
                                        {"name": p[5], "kind": "services"})
                return 200, copy.deepcopy(svc)
        if p[:4] == ["apis", "apps", "v1", "namespaces"] and len(p) == 6 and p[5] == "deployments":
            verb = "list" if verb == "get" else verb
            self._guard(verb, "deployments", "apps", p[4], None)
            return self._deployments(verb, p[4], ctype, body, query)
        if p[:4] == ["apis", "apps", "v1", "namespaces"] and len(p) == 7 and p[5] == "deployments":
            self._guard(verb, "deployments", "apps", p[4], p[6])
            return self._deployment(verb, p[4], p[6], ctype, body, query)
        if p[:2] == ["apis", "networking.istio.io"]:
            if not self.fake.istio_installed:
                return 404, "404 page not found"
            if p[2:4] == ["v1", "namespaces"] and len(p) >= 6 and p[5] in ISTIO_KINDS:
                name = p[6] if len(p) == 7 else None
                if name is None and verb == "get":
                    verb = "list"
                self._guard(verb, p[5], "networking.istio.io", p[4], name)
                return self._istio_object(p[5], verb, p[4], name, ctype, body, query)
        return 404, "404 page not found"

    def _namespace(self, ns: str) -> tuple[int, Any]:
        with self.fake.lock:
            if ns not in self.fake.namespaces:
                return 404, _status(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
            return 200, {"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": ns, "labels": dict(self.fake.namespaces[ns])},
                         "status": {"phase": "Active"}}

    @staticmethod
    def _check_patch_type(ctype: str, allowed: tuple[str, ...]) -> None:
        if ctype.split(";")[0].strip() not in allowed:
            raise HttpError(415, _status(415, "UnsupportedMediaType",
                                         f"the body of the request was in an unknown format - accepted media "
                                         f"types include: {', '.join(allowed)}"))

    @staticmethod
    def _check_rv(current: dict[str, Any], body: Any, kind: str, name: str) -> None:
        sent = ((body or {}).get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != current["metadata"]["resourceVersion"]:
            raise HttpError(409, _status(409, "Conflict", f'Operation cannot be fulfilled on {kind} "{name}": the '
                                         "object has been modified; please apply your changes to the latest "
                                         "version and try again"))

    def _deployment(self, verb: str, ns: str, name: str, ctype: str, body: Any,
                    query: dict[str, str]) -> tuple[int, Any]:
        fake, key = self.fake, (ns, name)
        with fake.lock:
            dep = fake.deployments.get(key)
            if dep is None:
                return 404, _status(404, "NotFound", f'deployments.apps "{name}" not found',
                                    {"name": name, "group": "apps", "kind": "deployments"})
            if verb == "get":
                fake._advance(key)
                return 200, copy.deepcopy(dep)
            if verb == "delete":
                del fake.deployments[key]
                fake.rollouts.pop(key, None)
                fake.terminating.pop(key, None)
                fake.deleted[key] = (dep, 2)  # its pods terminate for two more listings
                return 200, _status(200, "", "deleted") | {"status": "Success"}
            if verb != "patch":
                return 405, _status(405, "MethodNotAllowed", f"{verb} is not served by the fake")
            self._check_patch_type(ctype, ("application/merge-patch+json", "application/strategic-merge-patch+json"))
            self._check_rv(dep, body, "deployments.apps", name)
            if not isinstance(body, dict) or set(body) - {"metadata", "spec"}:
                raise HttpError(400, _status(400, "BadRequest", "the fake accepts metadata/spec patches only"))
            old_hash = template_hash(dep["spec"]["template"])
            new_spec = merge_patch(dep["spec"], body.get("spec") or {})
            for k, v in (body.get("metadata") or {}).items():
                if k in ("labels", "annotations"):
                    dep["metadata"][k] = merge_patch(dep["metadata"].get(k) or {}, v)
            if new_spec != dep["spec"]:
                dep["spec"] = new_spec
                dep["metadata"]["generation"] += 1
                if template_hash(new_spec["template"]) != old_hash:
                    fake._remember_template(dep)  # pods created from now on carry these annotations
                    fake._start_rollout(key, dep, old_hash)
            dep["metadata"]["resourceVersion"] = fake._next_rv()
            return 200, copy.deepcopy(dep)

    def _deployments(self, verb: str, ns: str, ctype: str, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """The collection: LIST by label selector, POST (validated as the API server does)."""
        fake = self.fake
        with fake.lock:
            if verb == "list":
                items = [copy.deepcopy(d) for (dns, _), d in fake.deployments.items() if dns == ns
                         and _selector_matches(query.get("labelSelector", ""), d["metadata"].get("labels") or {})]
                return 200, {"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {}, "items": items}
            if verb != "create":
                return 405, _status(405, "MethodNotAllowed", f"{verb} is not served by the fake")
            self._check_patch_type(ctype, ("application/json",))
            new = copy.deepcopy(body)
            name = new["metadata"]["name"]
            if (ns, name) in fake.deployments:
                return 409, _status(409, "AlreadyExists", f'deployments.apps "{name}" already exists')
            _validate_deployment(new, query.get("fieldValidation") == "Strict")
            new["metadata"].update(namespace=ns, generation=1, resourceVersion=fake._next_rv(), uid=f"uid-{name}")
            fake.deployments[(ns, name)] = new
            fake._remember_template(new)
            fake._created((ns, name), new)
            return 201, copy.deepcopy(new)

    def _istio_object(self, plural: str, verb: str, ns: str, name: str | None, ctype: str, body: Any,
                      query: dict[str, str]) -> tuple[int, Any]:
        fake = self.fake
        kind = ISTIO_KINDS[plural]
        store = fake.drs if plural == "destinationrules" else fake.vss
        qualified = f"{plural}.networking.istio.io"

        def stored(obj_name: str) -> None:
            if plural == "destinationrules":
                fake._dr_stored(ns, obj_name)

        strict = query.get("fieldValidation") == "Strict"
        with fake.lock:
            if verb == "list":
                items = [copy.deepcopy(d) for (dns, _), d in store.items() if dns == ns]
                return 200, {"apiVersion": "networking.istio.io/v1", "kind": f"{kind}List", "items": items}
            if verb == "create":
                self._check_patch_type(ctype, ("application/json",))
                new = copy.deepcopy(body)
                name = new["metadata"]["name"]
                if (ns, name) in store:
                    return 409, _status(409, "AlreadyExists", f'{qualified} "{name}" already exists')
                _validate_istio(kind, new, strict)
                new["metadata"].update(namespace=ns, generation=1, resourceVersion=fake._next_rv())
                store[(ns, name)] = new
                stored(name)
                return 201, copy.deepcopy(new)
            assert name is not None
            current = store.get((ns, name))
            if current is None:
                return 404, _status(404, "NotFound", f'{qualified} "{name}" not found',
                                    {"name": name, "group": "networking.istio.io", "kind": plural})
            if verb == "get":
                return 200, copy.deepcopy(current)
            if verb == "delete":
                del store[(ns, name)]
                stored(name)
                return 200, _status(200, "", "deleted") | {"status": "Success"}
            if verb == "patch":
                self._check_patch_type(ctype, ("application/merge-patch+json", "application/json-patch+json",
                                               "application/apply-patch+yaml"))
                self._check_rv(current, body, qualified, name)
                new = merge_patch(current, body)
                new["metadata"]["name"] = name
                _validate_istio(kind, new, strict)
                if new["spec"] != current["spec"]:
                    new["metadata"]["generation"] += 1
                new["metadata"]["resourceVersion"] = fake._next_rv()
                store[(ns, name)] = new
                stored(name)
                return 200, copy.deepcopy(new)
            return 405, _status(405, "MethodNotAllowed", f"{verb} is not served by the fake")


def _pod_fault(pod: dict[str, Any] | None) -> dict[str, float]:
    """The misbehaving-replica environment (``autotune.targets.kubernetes._faults``) of a pod's
    containers, as the app reads it: delay_ms, factor, error_rate, reset_rate."""
    out = {"delay_ms": 0.0, "factor": 1.0, "error_rate": 0.0, "reset_rate": 0.0}
    keys = {ENV_DELAY_MS: "delay_ms", ENV_SERVICE_TIME_FACTOR: "factor", ENV_ERROR_RATE: "error_rate",
            ENV_RESET_RATE: "reset_rate"}
    for container in ((pod or {}).get("spec") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") in keys:
                out[keys[env["name"]]] = float(env["value"])
    return out


class _Backend(BaseHTTPRequestHandler):
    """The service as seen through the client sidecars: it acts on what the cluster stores.

    The DestinationRule's circuit breakers are enforced as Envoy does for HTTP/1.1: at most
    min(``maxConnections``, ``http2MaxRequests``) requests in flight, at most
    ``http1MaxPendingRequests`` more waiting; any further one is answered 503 with
    ``x-envoy-overloaded: true`` at once. An admitted request goes round-robin to one endpoint of
    Service ``service`` (the running pods its selector picks; with no such Service, to no pod in
    particular), waits ``service_time_s`` and is answered 200, unless the endpoint is a
    misbehaving replica: its ``AUTOTUNE_FAULT_*`` environment then adds delay, multiplies the
    service time, answers 503 or resets the connection (seeded, per endpoint). No retries and no
    outlier detection are modelled. The 200's body reports the stored ``trafficPolicy``, the
    running pods' annotations and the endpoint (JSON); each request charges sidecar CPU to its
    endpoint (or to every running pod without a Service).
    """

    fake: FakeCluster
    namespace: str
    service: str = "backend"
    destination_rule: str
    service_time_s: float
    gate: threading.Condition
    state: dict[str, int]  # in_flight, pending
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _limits(self) -> tuple[float, float, dict[str, Any] | None]:
        dr = self.fake.dr(self.namespace, self.destination_rule)
        policy = (dr or {}).get("spec", {}).get("trafficPolicy")
        pool = (policy or {}).get("connectionPool") or {}
        tcp, http = pool.get("tcp") or {}, pool.get("http") or {}
        active = min(tcp.get("maxConnections") or math.inf, http.get("http2MaxRequests") or math.inf)
        return active, http.get("http1MaxPendingRequests") or math.inf, policy

    def _admit(self, active: float, queue: float) -> bool:
        with self.gate:
            st = self.state
            if st["in_flight"] >= active:
                if st["pending"] >= queue:
                    return False
                st["pending"] += 1
                while st["in_flight"] >= active:
                    self.gate.wait(1.0)
                st["pending"] -= 1
            st["in_flight"] += 1
            return True

    def _release(self) -> None:
        with self.gate:
            self.state["in_flight"] -= 1
            self.gate.notify()

    def _pick(self) -> dict[str, Any] | None:
        endpoints = self.fake.endpoints(self.namespace, self.service)
        if not endpoints:
            return None
        with self.gate:
            self.state["rr"] = self.state.get("rr", 0) + 1
            return endpoints[self.state["rr"] % len(endpoints)]

    def do_GET(self) -> None:
        active, queue, policy = self._limits()
        if not self._admit(active, queue):
            self._reply(503, b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
                        {"x-envoy-overloaded": "true"})
            return
        try:
            endpoint = self._pick()
            fault = _pod_fault(endpoint)
            name = endpoint["metadata"]["name"] if endpoint else None
            time.sleep(self.service_time_s * fault["factor"] + fault["delay_ms"] / 1000)
            self.fake.serve_request(self.namespace, name)
            draw = self.fake.rng.random()
            if draw < fault["reset_rate"]:
                self.fake.fault_replies[name or ""] = self.fake.fault_replies.get(name or "", 0) + 1
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()  # RST, no response
                return
            if draw < fault["reset_rate"] + fault["error_rate"]:
                self.fake.fault_replies[name or ""] = self.fake.fault_replies.get(name or "", 0) + 1
                self._reply(503, b"misbehaving replica", {"Content-Type": "text/plain"})
                return
            pods = {p["metadata"]["name"]: p["metadata"].get("annotations") or {}
                    for p in self.fake.running_pods(self.namespace)}
            self._reply(200, json.dumps({"trafficPolicy": policy, "pods": pods, "endpoint": name}).encode(),
                        {"Content-Type": "application/json"})
        finally:
            self._release()

    def _reply(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _BackendServer(_QuietServer):
    request_queue_size = 128  # a burst of concurrent clients is answered (503s included), not refused


class DictStore:
    """The study's durable state, in memory."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value


@dataclass
class KubeEnv:
    """A fake cluster, the service's stand-in (``backend_url``, a tiny HTTP server on 127.0.0.1),
    and optionally a real Prometheus scraping the fake kubelet's cAdvisor endpoint."""

    cluster: FakeCluster
    kubeconfig: Path
    backend_url: str
    prometheus_url: str
    scrape_interval_s: float = 0.25

    NAMESPACE = "staging"
    DEPLOYMENT = "web"
    DR = "backend"
    SERVICE = "backend"
    HOST = "backend.staging.svc.cluster.local"

    def seed(self, annotations: dict[str, str] | None = None, traffic_policy: dict[str, Any] | None = None,
             dr: bool = True, labelled: bool = True) -> None:
        """A fresh namespace (labelled for staging), Deployment ``web``, Service ``backend`` selecting
        its pods (``web`` is the service's backend: target.serviceDeployment) and DestinationRule
        ``backend``."""
        c = self.cluster
        c.reset()
        c.add_namespace(self.NAMESPACE, {"autotune.io/staging": "true"} if labelled else {})
        c.add_namespace("production", {"autotune.io/staging": "true"})
        c.add_deployment(self.NAMESPACE, self.DEPLOYMENT, annotations=annotations)
        c.add_deployment("production", self.DEPLOYMENT, annotations=annotations)
        for ns in (self.NAMESPACE, "production"):
            c.add_service(ns, self.SERVICE, {"app": self.DEPLOYMENT})
        if dr:
            c.add_destination_rule(self.NAMESPACE, self.DR, self.HOST, traffic_policy)
            c.add_destination_rule("production", self.DR, self.HOST, traffic_policy)

    def target_data(self, **overrides: Any) -> dict[str, Any]:
        """The spec's ``target`` block for this environment."""
        data: dict[str, Any] = {
            "kind": "kubernetes", "kubeconfig": str(self.kubeconfig), "context": "fake",
            "namespace": self.NAMESPACE, "deployment": self.DEPLOYMENT, "destinationRule": self.DR,
            "host": self.HOST, "serviceUrl": self.backend_url, "serviceDeployment": self.DEPLOYMENT,
            "pollInterval": 0.05,
            "requestTimeout": 5, "sidecarAdminUrl": f"{self.cluster.url}/sidecar/{self.NAMESPACE}",
            "prometheus": {"url": self.prometheus_url, "scrapeInterval": self.scrape_interval_s, "timeout": 5},
        }
        data.update(overrides)
        return data


@contextlib.contextmanager
def kube_env(tmp: Path, prometheus: bool = True, scrape_interval_s: float = 0.25) -> Iterator[KubeEnv]:
    """Start the fake cluster, the backend and (``prometheus``) a real Prometheus scraping the fake
    kubelet every ``scrape_interval_s``; stop them all."""
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(FakeCluster())

        class Backend(_Backend):
            fake, namespace, destination_rule = cluster, KubeEnv.NAMESPACE, KubeEnv.DR
            service_time_s = 0.02
            gate = threading.Condition()
            state: ClassVar[dict[str, int]] = {"in_flight": 0, "pending": 0}

        backend = _BackendServer(("127.0.0.1", 0), Backend)
        threading.Thread(target=backend.serve_forever, name="fake-backend", daemon=True).start()
        stack.callback(backend.server_close)
        stack.callback(backend.shutdown)
        prom_url = "http://127.0.0.1:9"  # nothing listens there
        if prometheus:
            from _prometheus import scraping_prometheus, wait_for_data

            prom_url = stack.enter_context(scraping_prometheus([f"{cluster.url}/metrics/cadvisor"],
                                                               scrape_interval_s))
            wait_for_data(prom_url, "up", samples=2, timeout=30)  # discovery takes a few seconds
        yield KubeEnv(cluster, cluster.kubeconfig(tmp / "kubeconfig"),
                      f"http://127.0.0.1:{backend.server_address[1]}", prom_url, scrape_interval_s)
