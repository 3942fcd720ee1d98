"""The ``autotune`` command and everything the terminal shows. Parses, calls the library, prints."""

from __future__ import annotations

from autotune.cli._main import main, run

__all__ = ["main", "run"]
