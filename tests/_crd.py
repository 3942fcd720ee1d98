"""The vendored Istio 1.30.3 CRDs as strict JSON schemas, shared by the tests and the fake API server."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).parent / "data" / "istio-crds"
DR_CRD = CRDS / "destinationrule.crd.yaml"
VS_CRD = CRDS / "virtualservice.crd.yaml"


@functools.cache
def load_crd(path: Path = DR_CRD) -> dict[str, Any]:
    """A CRD document (parsed once)."""
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # type: ignore[no-any-return]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy with ``additionalProperties: false`` on every object that declares properties.
    The API server prunes unknown fields of a CRD object; ``fieldValidation=Strict`` rejects them,
    and so does this schema."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def strict_dr_schema(version: str = "v1") -> dict[str, Any]:
    """The DestinationRule ``openAPIV3Schema`` of ``version``, strict."""
    (v,) = [v for v in load_crd()["spec"]["versions"] if v["name"] == version]
    return strict(v["schema"]["openAPIV3Schema"])


@functools.cache
def strict_vs_schema(version: str = "v1") -> dict[str, Any]:
    """The VirtualService ``openAPIV3Schema`` of ``version``, strict."""
    (v,) = [v for v in load_crd(VS_CRD)["spec"]["versions"] if v["name"] == version]
    return strict(v["schema"]["openAPIV3Schema"])
