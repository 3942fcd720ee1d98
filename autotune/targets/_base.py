"""The target contract: where a trial's settings are applied and the proxy's cost is measured.

A trial runs ``apply → wait_ready → begin_window … (load) … end_window``; the study calls
``restore`` after the study, after a failed trial and on Ctrl-C. One conformance suite
(``tests/test_target_conformance.py``) runs against every implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from autotune.mesh import MeshConfig
from autotune.spec import SearchParam


@dataclass(frozen=True)
class ProxyUsage:
    """What the sidecar cost over one measurement window."""

    cpu_cores: float
    window_s: float
    periods: int = 0
    throttled_periods: int = 0
    throttled_s: float = 0.0
    #: Further figures a target measures over the same window (e.g. server-side latency).
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def throttled_ratio(self) -> float:
        """Share of CPU-quota periods in which the proxy was throttled (0 when no quota applies)."""
        return self.throttled_periods / self.periods if self.periods else 0.0


class StateStore(Protocol):
    """Durable key/value state kept with the study (Optuna study user attributes), so that what a
    target must restore survives a crash and is found by the next start. Values are JSON."""

    def get(self, key: str) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...


class Target(ABC):
    """A place where mesh settings are applied and measured.

    Guarantees every implementation gives:
    - ``start`` runs pre-flight checks and records the baseline; it raises ``TargetError`` with
      what to fix when the target cannot be used, and leaves nothing behind when it does.
    - ``apply`` puts exactly one ``MeshConfig`` in force (left-out settings at Istio's defaults);
      ``wait_ready`` returns only once traffic is served with it, else raises ``TrialFailed``.
    - ``begin_window``/``end_window`` bracket the measurement; ``end_window`` returns the proxy's
      CPU use over exactly that interval.
    - ``restore`` puts the baseline back and is safe to call at any point, any number of times.
    - ``close`` restores and releases every process, cgroup or connection; idempotent.
    Not thread-safe: one study drives one target.
    """

    name: str = "target"

    def bind_state(self, store: StateStore) -> None:  # noqa: B027 - optional hook
        """Called before ``start`` with the study's durable state; a target whose baseline lives
        outside this process (a cluster) keeps its snapshot there and restores it on start if a
        previous run crashed before restoring."""

    @abstractmethod
    def start(self) -> None:
        """Pre-flight checks and baseline snapshot."""

    def check_supported(self, space: list[SearchParam]) -> None:  # noqa: B027 - optional hook
        """Raise ``UnsupportedParameter`` if a parameter of ``space`` cannot be enforced here."""

    @abstractmethod
    def apply(self, config: MeshConfig) -> None:
        """Put ``config`` in force. Raises ``TrialFailed`` if the config is rejected."""

    @abstractmethod
    def wait_ready(self, timeout_s: float) -> None:
        """Block until the applied config serves traffic; ``TrialFailed(FailReason.NOT_READY, …)`` after timeout."""

    @property
    @abstractmethod
    def load_url(self) -> str:
        """Base URL the load is sent to (the only address load may go to)."""

    @abstractmethod
    def begin_window(self) -> None:
        """Mark the start of the measurement window."""

    @abstractmethod
    def end_window(self) -> ProxyUsage:
        """Mark its end and return the proxy's CPU use over the window."""

    def observed_config(self) -> dict[str, Any]:
        """Evidence of what the proxy actually runs with (e.g. its concurrency), for the trial record."""
        return {}

    @abstractmethod
    def restore(self) -> None:
        """Put the baseline back. Idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Restore and release everything. Idempotent."""

    def __enter__(self) -> Target:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
