"""The load: a fixed, paced Locust run in its own process, measured over a window."""

from __future__ import annotations

from autotune.load._locust import run_load, run_load_windows
from autotune.load._result import LoadResult

__all__ = ["LoadResult", "run_load", "run_load_windows"]
