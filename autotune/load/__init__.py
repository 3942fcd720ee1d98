"""The load: a fixed, paced Locust run in its own process, measured over a window."""

from __future__ import annotations

from autotune.load._result import LoadResult
from autotune.load._runner import run_load, run_load_windows

__all__ = ["LoadResult", "run_load", "run_load_windows"]
