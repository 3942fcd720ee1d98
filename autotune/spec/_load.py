"""Reading a spec file: YAML with duplicated keys refused, errors naming the file and position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autotune.errors import SpecError
from autotune.spec._models import StudySpec, parse_spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicated mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicated key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file. Raises ``SpecError`` naming the file, field path and rule."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(p), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SpecError(str(p), [f"YAML syntax at {where}: {exc.problem}"]) from None
    return parse_spec(data, str(p))
