"""One error root for autotune; operational failures carry a reason a study records on the trial."""

from __future__ import annotations


class AutotuneError(Exception):
    """Root of every error autotune raises on purpose. The CLI prints it as ``Error: …``."""


class SpecError(AutotuneError):
    """A study spec is invalid. The message names the file, the field path and the rule broken."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid study spec {path}:\n{lines}")


class TrialFailed(AutotuneError):
    """One trial could not be measured. ``reason`` is a short machine-friendly tag
    (``proxy-start``, ``not-ready``, ``load``, ``timeout``, …) and the message says what happened.
    The study records the trial as FAIL with both and goes on."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class TargetError(AutotuneError):
    """The target cannot be used at all (a pre-flight check failed). The study does not start."""


class UnsupportedParameter(TargetError):
    """A target cannot honestly apply a parameter of the search space on this machine."""
