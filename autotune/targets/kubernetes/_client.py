"""The few Kubernetes API calls the target makes, on plain JSON dicts, with errors made readable.

Built on the official ``kubernetes`` client. Every call raises ``ApiCallFailed`` (never the client's
``ApiException`` or a urllib3 error) carrying the HTTP status, the verb and resource that were
attempted and the API server's own message; the target turns it into ``TargetError`` at start and
``TrialFailed`` during a trial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from kubernetes import client
from kubernetes import config as _config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from autotune.errors import TargetError
from autotune.spec import KubernetesTargetSpec

logger = logging.getLogger(__name__)
config: Any = _config  # kube_config's loaders are untyped

DR_GROUP, DR_VERSION, DR_PLURAL = "networking.istio.io", "v1", "destinationrules"
VS_PLURAL = "virtualservices"
FIELD_MANAGER = "autotune"
MERGE_PATCH = "application/merge-patch+json"
T = TypeVar("T")


@dataclass(frozen=True)
class Resource:
    """What a call touched, for messages and RBAC hints: ``patch deployments.apps "web"``."""

    verb: str
    resource: str
    group: str
    name: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def __str__(self) -> str:
        return f"{self.verb} {self.qualified}" + (f' "{self.name}"' if self.name else "")


class ApiCallFailed(Exception):
    """One API call failed. ``status`` is the HTTP status (0: no answer, e.g. a timeout)."""

    def __init__(self, status: int, what: Resource, namespace: str, message: str,
                 status_body: dict[str, Any] | None = None) -> None:
        self.status, self.what, self.namespace, self.server_message = status, what, namespace, message
        self.status_body = status_body
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line saying what failed and what to do about it."""
        where = f"{self.what} in namespace {self.namespace}"
        if self.status == 0:
            return f"{where}: no answer from the API server ({self.server_message})"
        if self.status == 401:
            return (f"{where}: 401 Unauthorized, the credentials were not accepted (log in again or "
                    f"check the kubeconfig user): {self.server_message}")
        if self.status == 403:
            w = self.what
            return (f"{where}: 403 Forbidden, RBAC does not allow verb {w.verb!r} on resource "
                    f"{w.resource!r} in API group {w.group!r} in namespace {self.namespace} "
                    f"(see cluster/ for the Role autotune needs): {self.server_message}")
        if self.status == 404:
            return f"{where}: 404 Not Found: {self.server_message}"
        if self.status == 409:
            return f"{where}: 409 Conflict (changed concurrently): {self.server_message}"
        if self.status in (400, 422):
            return f"{where}: the API server rejected it ({self.status}): {self.server_message}"
        return f"{where}: HTTP {self.status}: {self.server_message}"

    @property
    def is_status_not_found(self) -> bool:
        """A 404 for a missing object (a Status body), not for an API group that is not served."""
        return self.status == 404 and (self.status_body or {}).get("reason") == "NotFound"


def make_api_client(spec: KubernetesTargetSpec) -> Any:
    """An ``ApiClient`` from the in-cluster service account or a kubeconfig context."""
    try:
        if spec.in_cluster:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        return config.new_client_from_config(config_file=spec.kubeconfig, context=spec.context,
                                             persist_config=False)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        source = "the in-cluster service account" if spec.in_cluster else (
            f"kubeconfig {spec.kubeconfig or '$KUBECONFIG or ~/.kube/config'}"
            + (f", context {spec.context!r}" if spec.context else ""))
        raise TargetError(f"cannot configure the Kubernetes client from {source}: {exc}") from exc


def _parse_error(exc: ApiException) -> tuple[str, dict[str, Any] | None]:
    body = exc.body.decode() if isinstance(exc.body, bytes) else exc.body
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            return body.strip()[:500], None
        if isinstance(data, dict) and data.get("kind") == "Status":
            return str(data.get("message") or exc.reason), data
        return body.strip()[:500], None
    return str(exc.reason or "no message"), None


class KubeApi:
    """The target's API calls, all scoped to one namespace. Results are JSON dicts."""

    def __init__(self, api_client: Any, namespace: str, timeout_s: float) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._authz = client.AuthorizationV1Api(api_client)

    def close(self) -> None:
        self.api_client.close()

    def _call(self, what: Resource, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ApiException as exc:
            message, body = _parse_error(exc)
            raise ApiCallFailed(int(exc.status or 0), what, self.namespace, message, body) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiCallFailed(0, what, self.namespace, f"{type(exc).__name__}: {exc}") from exc

    def _raw(self, what: Resource, fn: Callable[[], Any]) -> dict[str, Any]:
        resp = self._call(what, fn)
        data = json.loads(resp.data) if hasattr(resp, "data") else resp
        if not isinstance(data, dict):
            raise ApiCallFailed(0, what, self.namespace, f"unexpected answer {str(data)[:200]!r}")
        return data

    @property
    def _opts(self) -> dict[str, Any]:
        return {"_request_timeout": self.timeout_s, "_preload_content": False}

    # -- namespace, deployment, pods -------------------------------------------------------

    def get_namespace(self) -> dict[str, Any]:
        return self._raw(Resource("get", "namespaces", "", self.namespace),
                         lambda: self._core.read_namespace(self.namespace, **self._opts))

    def get_deployment(self, name: str) -> dict[str, Any]:
        return self._raw(Resource("get", "deployments", "apps", name),
                         lambda: self._apps.read_namespaced_deployment(name, self.namespace, **self._opts))

    def patch_deployment(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch (``null`` deletes a key), ``fieldManager=autotune``, ``fieldValidation=Strict``."""
        return self._raw(Resource("patch", "deployments", "apps", name), lambda: self._apps.patch_namespaced_deployment(
            name, self.namespace, patch, field_manager=FIELD_MANAGER, field_validation="Strict",
            _content_type=MERGE_PATCH, **self._opts))

    def list_deployments(self, label_selector: str) -> list[dict[str, Any]]:
        data = self._raw(Resource("list", "deployments", "apps"), lambda: self._apps.list_namespaced_deployment(
            self.namespace, label_selector=label_selector, **self._opts))
        return list(data.get("items") or [])

    def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        sent: Any = body  # the client sends a JSON dict as it is
        return self._raw(Resource("create", "deployments", "apps", name),
                         lambda: self._apps.create_namespaced_deployment(
                             self.namespace, sent, field_manager=FIELD_MANAGER, field_validation="Strict",
                             _headers={"Content-Type": "application/json"}, **self._opts))

    def delete_deployment(self, name: str) -> None:
        """Background propagation (the API's default): its ReplicaSet and pods are garbage-collected
        after the Deployment is gone; wait for the pods by listing them."""
        self._raw(Resource("delete", "deployments", "apps", name), lambda: self._apps.delete_namespaced_deployment(
            name, self.namespace, propagation_policy="Background", **self._opts))

    def get_service(self, name: str) -> dict[str, Any]:
        return self._raw(Resource("get", "services", "", name),
                         lambda: self._core.read_namespaced_service(name, self.namespace, **self._opts))

    def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        data = self._raw(Resource("list", "pods", ""), lambda: self._core.list_namespaced_pod(
            self.namespace, label_selector=label_selector, **self._opts))
        return list(data.get("items") or [])

    # -- Istio custom resources (DestinationRule, VirtualService) --------------------------

    def _cr(self, verb: str, plural: str, name: str | None) -> Resource:
        return Resource(verb, plural, DR_GROUP, name)

    def get_custom(self, plural: str, name: str) -> dict[str, Any]:
        return self._raw(self._cr("get", plural, name), lambda: self._custom.get_namespaced_custom_object(
            DR_GROUP, DR_VERSION, self.namespace, plural, name, **self._opts))

    def create_custom(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        return self._raw(self._cr("create", plural, name), lambda: self._custom.create_namespaced_custom_object(
            DR_GROUP, DR_VERSION, self.namespace, plural, body, field_manager=FIELD_MANAGER,
            field_validation="Strict", _headers={"Content-Type": "application/json"}, **self._opts))

    def patch_custom(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch (custom resources take no strategic merge patch)."""
        return self._raw(self._cr("patch", plural, name), lambda: self._custom.patch_namespaced_custom_object(
            DR_GROUP, DR_VERSION, self.namespace, plural, name, patch, field_manager=FIELD_MANAGER,
            field_validation="Strict", _content_type=MERGE_PATCH, **self._opts))

    def delete_custom(self, plural: str, name: str) -> None:
        self._raw(self._cr("delete", plural, name), lambda: self._custom.delete_namespaced_custom_object(
            DR_GROUP, DR_VERSION, self.namespace, plural, name, **self._opts))

    def get_destination_rule(self, name: str) -> dict[str, Any]:
        return self.get_custom(DR_PLURAL, name)

    def create_destination_rule(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.create_custom(DR_PLURAL, body)

    def patch_destination_rule(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.patch_custom(DR_PLURAL, name, patch)

    def delete_destination_rule(self, name: str) -> None:
        self.delete_custom(DR_PLURAL, name)

    # -- RBAC ------------------------------------------------------------------------------

    def can_i(self, verb: str, resource: str, group: str) -> bool | None:
        """SelfSubjectAccessReview in the namespace; ``None`` when the review itself is unavailable."""
        body: Any = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"namespace": self.namespace, "verb": verb,
                                                "group": group, "resource": resource}}}
        try:
            data = self._raw(Resource("create", "selfsubjectaccessreviews", "authorization.k8s.io"),
                             lambda: self._authz.create_self_subject_access_review(
                                 body, _headers={"Content-Type": "application/json"}, **self._opts))
        except ApiCallFailed as exc:
            logger.debug("access review unavailable: %s", exc)
            return None
        return bool((data.get("status") or {}).get("allowed"))
