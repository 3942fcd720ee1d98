"""Where trial metrics come from when the target cannot measure them itself (Prometheus)."""

from __future__ import annotations

from autotune.metrics._prometheus import PrometheusReader

__all__ = ["PrometheusReader"]
