"""How the study loop tells a person (or nobody) what is happening."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from autotune.mesh import MeshConfig


@dataclass(frozen=True)
class TrialOutcome:
    """One finished trial as the observer sees it."""

    number: int
    config: MeshConfig
    baseline: bool
    state: str  # "COMPLETE" or "FAIL"
    metrics: dict[str, float] = field(default_factory=dict)
    feasible: bool = False
    reason: str = ""
    violations: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: False for what does not use up the trial budget (a baseline drift re-measurement).
    counts: bool = True


class Observer(Protocol):
    """Receives progress. Implementations must not raise."""

    def study_started(self, name: str, done: int, total: int) -> None: ...
    def trial_started(self, number: int, index: int, total: int, config: MeshConfig,
                      baseline: bool, stage: str = "trial") -> None:
        """``stage`` is ``"trial"`` during the search, ``"confirm"`` during confirmation and
        ``"recheck"`` during a scheduled run's re-check (``number`` is then -1)."""
    def phase(self, name: str, fraction: float) -> None: ...
    def trial_finished(self, outcome: TrialOutcome, front: list[TrialOutcome]) -> None:
        """``front``: the feasible Pareto configs so far, sorted by the first objective."""


class NullObserver:
    """Says nothing; what the library API and the tests use by default."""

    def study_started(self, name: str, done: int, total: int) -> None:
        pass

    def trial_started(self, number: int, index: int, total: int, config: MeshConfig,
                      baseline: bool, stage: str = "trial") -> None:
        pass

    def phase(self, name: str, fraction: float) -> None:
        pass

    def trial_finished(self, outcome: TrialOutcome, front: list[TrialOutcome]) -> None:
        pass
