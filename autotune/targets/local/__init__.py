"""The local target: a real Envoy on 127.0.0.1, CPU-limited by a cgroup quota, in front of real
upstream HTTP endpoints on loopback."""

from __future__ import annotations

from autotune.targets.local._target import LocalTarget

__all__ = ["LocalTarget"]
