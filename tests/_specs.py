"""Small, fast study specs for tests (seconds per trial, storage and results under tmp_path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autotune.spec import StudySpec, parse_spec


def small_spec_data(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The spec as a document; ``overrides`` are dotted paths, e.g. ``{"load.users": 20}``."""
    data: dict[str, Any] = {
        "study": {"name": "t", "storage": f"sqlite:///{tmp_path}/s.db", "trials": 3, "seed": 1,
                  "sampler": "random", "resultsDir": str(tmp_path / "out")},
        "parameters": {
            "connectionPool.tcp.maxConnections": {"low": 1, "high": 256, "log": True},
            "proxy.concurrency": {"low": 1, "high": 2},
            "proxy.cpuLimit": {"low": "100m", "high": "1", "log": True},
        },
        "load": {"users": 5, "ratePerUser": 20},
        # Short phases; xdsPush 0 and a short rollout timeout suit the fake cluster.
        "timing": {"warmup": 1, "window": 2, "xdsPush": 0, "rolloutTimeout": 10},
        # One window per trial, no drift checks, no confirmation: fast; test_noise_control.py
        # turns them on.
        "measurement": {"repeats": 1, "maxRepeats": 1, "driftEvery": 0, "confirmRounds": 0},
        "target": {"kind": "local", "upstream": {"endpoints": 2, "serviceTimeMs": 2}},
    }
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def small_spec(tmp_path: Path, **overrides: Any) -> StudySpec:
    return parse_spec(small_spec_data(tmp_path, **overrides), str(tmp_path / "spec.yaml"))


def write_spec(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(small_spec_data(tmp_path, **overrides), sort_keys=False))
    return path
