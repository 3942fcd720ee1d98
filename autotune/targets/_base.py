"""The target contract: where a trial's settings are applied and the proxy's cost is measured.

A trial runs ``apply → wait_ready → begin_window … (load) … end_window``; the study calls
``restore`` after the study, after a failed trial and on Ctrl-C. One conformance suite
(``autotune.testing.conformance``, run by ``tests/test_target_conformance.py``) checks every
implementation against the guarantees written here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol

from autotune.errors import UnsupportedParameter
from autotune.mesh import PARAMETERS, MeshConfig
from autotune.spec import EndpointFault, SearchParam


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


#: The ``MeshConfig`` fields every target reads back from where they are enforced (the
#: circuit-breaker and per-connection limits); the other traffic settings are not compared yet.
POOL_FIELDS = ("max_connections", "http1_max_pending_requests", "http2_max_requests",
               "max_requests_per_connection", "max_retries")
PARAMETERS_BY_FIELD = {p.field: p.name for p in PARAMETERS.values()}


@dataclass(frozen=True)
class Observed:
    """What the proxy actually runs with, read back from where it is enforced, in the same shape
    for every target.

    ``pool`` holds the connection-pool fields as the proxy (local: Envoy's admin) or the cluster
    (Kubernetes: the stored DestinationRule) holds them, ``None`` where Istio's "unset" applies;
    its ``concurrency`` and ``cpu_limit`` are always ``None``. ``concurrency`` is the worker
    count in force, ``cpu_limit`` the CPU limit in force in cores (``None``: no limit).
    ``details`` is free-form evidence for diagnostics (JSON-serialisable).
    """

    pool: MeshConfig
    concurrency: int
    cpu_limit: float | None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool.concurrency is not None or self.pool.cpu_limit is not None:
            raise ValueError("Observed.pool holds connection-pool fields only; "
                             f"got concurrency={self.pool.concurrency}, cpu_limit={self.pool.cpu_limit}")

    @staticmethod
    def expected(config: MeshConfig) -> Observed:
        """What a target that put ``config`` in force must observe: its pool fields as given, the
        concurrency and CPU limit once Istio's defaults are filled in."""
        return Observed(pool=replace(config, concurrency=None, cpu_limit=None),
                        concurrency=config.effective_concurrency, cpu_limit=config.effective_cpu_limit)

    def differences(self, other: Observed) -> list[str]:
        """One line per tuned field that differs from ``other`` (``details`` are ignored; CPU
        limits are compared to the millicore)."""
        out = [f"{PARAMETERS_BY_FIELD[name]}: {getattr(self.pool, name)} != {getattr(other.pool, name)}"
               for name in POOL_FIELDS if getattr(self.pool, name) != getattr(other.pool, name)]
        if self.concurrency != other.concurrency:
            out.append(f"proxy.concurrency: {self.concurrency} != {other.concurrency}")
        if not _same_cpu(self.cpu_limit, other.cpu_limit):
            out.append(f"proxy.cpuLimit: {self.cpu_limit} != {other.cpu_limit}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """For the trial record: Istio-named pool values (unset ones left out), the worker count,
        the CPU limit and the details."""
        return {"pool": self.pool.to_params(), "concurrency": self.concurrency,
                "cpu_limit": self.cpu_limit, "details": self.details}


def _same_cpu(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, abs_tol=0.0005)


class StateStore(Protocol):
    """Durable key/value state kept with the study (Optuna study user attributes), so that what a
    target must restore survives a crash and is found by the next start. Values are JSON."""

    def get(self, key: str) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...


class Target(ABC):
    """A place where mesh settings are applied and measured.

    Guarantees every implementation gives (``autotune.testing.conformance`` checks each):

    - ``start`` runs pre-flight checks and records the baseline; it raises ``TargetError`` with
      what to fix when the target cannot be used, and then leaves nothing behind (no process,
      cgroup or temporary file; no change outside the process). Calling it again is a no-op;
      after ``close`` it raises ``TargetError``.
    - ``apply`` puts exactly one ``MeshConfig`` in force: every field it sets, and every field it
      leaves out back at Istio's default, whatever was applied before. It raises
      ``TrialFailed`` when the config is refused (``REJECTED``, ``PROXY_START``, ``API``…).
      ``wait_ready(timeout_s)`` returns only once traffic is served with it, else raises
      ``TrialFailed``. ``observed()`` then reports it (``Observed.expected(config)``).
    - ``begin_window``/``end_window`` bracket the measurement; ``end_window`` returns the proxy's
      CPU use over exactly that interval (``window_s`` is its wall-clock length). A second
      ``begin_window`` starts the window again; ``end_window`` without an open window raises
      ``TargetError``. ``end_window`` may block until the window's figures are available, for
      at most ``end_window_wait_s`` seconds.
    - ``restore`` puts the baseline back (``observed()`` equals what it was after ``start``); it
      is a no-op before ``start``, after ``close`` and when the baseline is in force, and raises
      ``TargetError`` (not ``TrialFailed``: it is not a trial's failure) when it cannot.
    - ``close`` restores and releases every process, cgroup, file and connection, at any point
      (before ``start``, after a failed ``start`` or ``apply``); a second call is a no-op. It
      releases everything it can and then raises ``TargetError`` if anything could not be
      restored or released.
    - Every other method raises ``TargetError`` when the target is not started (or closed).

    Not thread-safe: one study drives one target.
    """

    name: str = "target"

    @property
    def end_window_wait_s(self) -> float:
        """The longest ``end_window`` may block (the load's time budget grows by this per window)."""
        return 0.0

    def bind_state(self, store: StateStore) -> None:  # noqa: B027 - optional hook
        """Called before ``start`` with the study's durable state; a target whose baseline lives
        outside this process (a cluster) keeps its snapshot there and restores it on start if a
        previous run crashed before restoring."""

    @abstractmethod
    def start(self) -> None:
        """Pre-flight checks and baseline snapshot."""

    def check_supported(self, space: list[SearchParam]) -> None:  # noqa: B027 - optional hook
        """Raise ``UnsupportedParameter`` if a parameter of ``space`` cannot be enforced here."""

    #: Whether :meth:`set_service_faults` can put faults in force (checked before a study starts).
    supports_service_faults: bool = False

    def set_service_faults(self, faults: Sequence[EndpointFault]) -> None:
        """Put a scenario's service faults in force on the upstream endpoints (the study calls it
        before the scenario's load, and with ``()`` after it, whatever happened). ``()`` puts the
        target's own default back (no faults, or the spec's ``target.upstream.faults``) and is
        always allowed. A target that cannot misbehave its service raises
        ``UnsupportedParameter`` (the default) — never silently measures without the faults."""
        if faults:
            raise UnsupportedParameter(
                f"the {self.name} target cannot apply service faults (scenario faults on "
                f"{sum(f.endpoints for f in faults)} endpoint(s)); remove them from the spec's scenarios")

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
        """Mark the start of the measurement window (again, if one is open)."""

    @abstractmethod
    def end_window(self) -> ProxyUsage:
        """Mark its end and return the proxy's CPU use over the window; ``TargetError`` if no
        window is open."""

    @abstractmethod
    def observed(self) -> Observed:
        """What the proxy runs with now, read back from where it is enforced (not from what was
        sent). Raises ``TargetError`` when not started, ``TrialFailed`` when it cannot be read."""

    @abstractmethod
    def restore(self) -> None:
        """Put the baseline back. Idempotent; ``TargetError`` if it cannot."""

    @abstractmethod
    def close(self) -> None:
        """Restore and release everything. Idempotent; ``TargetError`` (after releasing what it
        could) if something could not be restored or released."""

    def __enter__(self) -> Target:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
