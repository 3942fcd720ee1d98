"""The load: a ``LoadDriver`` runs a fixed load over a warm-up and measured windows. ``LocustDriver``
runs a paced Locust load in its own process."""

from __future__ import annotations

from autotune.load._driver import BUILTIN_LOCUSTFILE, LoadDriver, LocustDriver, StopFn, WindowFn
from autotune.load._locust import ProgressFn, run_load_windows
from autotune.load._result import LoadResult

__all__ = ["BUILTIN_LOCUSTFILE", "LoadDriver", "LoadResult", "LocustDriver", "ProgressFn", "StopFn",
           "WindowFn", "run_load_windows"]
