"""One error root for autotune; operational failures carry a reason a study records on the trial."""

from __future__ import annotations

from enum import StrEnum


class FailReason(StrEnum):
    """Why a trial failed: the one list of reasons a study records on a FAIL trial (``fail_reason``).

    The values are what ``trials.csv`` and the dashboard show.
    """

    #: Envoy (local) would not start or exited while starting.
    PROXY_START = "proxy-start"
    #: The applied config never served traffic within the ready timeout.
    NOT_READY = "not-ready"
    #: A rollout failed (ReplicaFailure, ProgressDeadlineExceeded) or timed out (Kubernetes).
    ROLLOUT_FAILED = "rollout-failed"
    #: The API server refused the config (HTTP 400/422: schema, strict decoding, webhook).
    REJECTED = "rejected"
    #: Another API error (403, 404, 5xx, conflict twice).
    API = "api"
    #: The API server did not answer in time.
    API_TIMEOUT = "api-timeout"
    #: The load generator failed: did not start, died, timed out, or recorded nothing.
    LOAD = "load"
    #: The metrics backend (Prometheus) had no data or failed for the window.
    METRICS = "metrics"
    #: No request succeeded, so there is no latency to optimize.
    NO_SUCCESS = "no-success"
    #: Ctrl-C or SIGTERM during the trial; it does not count against the budget and is re-run.
    INTERRUPTED = "interrupted"
    #: The run measuring the trial died (SIGKILL, power loss, OOM) and left it RUNNING; the next
    #: run of the study records it so. Does not count against the budget.
    CRASHED = "crashed"
    #: The study storage could not record the trial (e.g. locked past the retry bound); the run
    #: stopped. Does not count against the budget.
    STORAGE = "storage"
    #: An unexpected error in autotune itself ended the run during the trial (a bug; the message
    #: has the exception). Does not count against the budget.
    INTERNAL = "internal-error"
    #: The proxy (local: Envoy) was found dead at the end of a measurement window; the window's
    #: errors are the crash's, not the config's. ``restore()`` starts it again. Counts against
    #: the budget: a config can make the proxy crash, and re-running it could loop.
    PROXY_DIED = "proxy-died"
    #: An upstream endpoint (a service "pod" of the local target) was found dead at the end of a
    #: measurement window. ``restore()`` starts it again. Does not count against the budget (the
    #: service failed, not the config).
    UPSTREAM_DIED = "upstream-died"
    #: The client sidecar did not run the applied cluster config (circuit breakers, protocol
    #: options) within the bound (local: right after the restart; Kubernetes: ``timing.xdsPush``).
    #: Counts against the budget (a config that never converges must not be re-run forever).
    NOT_PROPAGATED = "not-propagated"

    @property
    def counts(self) -> bool:
        """Whether a trial that failed for this reason uses up the study's budget: a failure of
        the config does, a failure of the run (interrupted, crashed, internal error) does not."""
        return self not in (FailReason.INTERRUPTED, FailReason.CRASHED, FailReason.STORAGE,
                            FailReason.INTERNAL, FailReason.UPSTREAM_DIED)


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
    """One trial could not be measured. ``reason`` says why (``FailReason``) and the message says
    what happened. The study records the trial as FAIL with both and goes on."""

    def __init__(self, reason: FailReason, message: str) -> None:
        self.reason = FailReason(reason)
        super().__init__(f"{self.reason}: {message}")


class StorageError(AutotuneError):
    """The study storage cannot be opened, read or written (locked past the retry bound, a path
    that is a folder, a database that does not exist where one is only read)."""


class StudyBusy(AutotuneError):
    """Another live run holds the study's lease; the message names it (pid, host, since when)."""


class ExportError(AutotuneError):
    """The results of a study could not be written (e.g. a read-only results folder)."""


class TargetError(AutotuneError):
    """The target cannot be used at all (a pre-flight check failed). The study does not start."""


class UnsupportedParameter(TargetError):
    """A target cannot honestly apply a parameter of the search space on this machine."""
