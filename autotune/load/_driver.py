"""The load seam: what the study loop needs from a load generator, and the Locust implementation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from autotune.load._locust import ProgressFn, run_load_windows
from autotune.load._result import LoadResult
from autotune.spec import LoadSpec

#: Called with the window's index (0-based) at the window's start or end.
WindowFn = Callable[[int], None]
#: Called with a window's index and result right after ``on_window_end``; ``True`` ends the run there.
StopFn = Callable[[int, LoadResult], bool]
#: The built-in paced locustfile.
BUILTIN_LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class LoadDriver(Protocol):
    """Runs one fixed load against a URL and measures it over back-to-back windows.

    Contract of :meth:`run`, for every implementation:

    - the load is ``load`` (users, rate, path), fixed for the whole run, sent to ``url`` only;
    - one warm-up of ``warmup_s`` (the spec's ``timing.warmup``), then ``windows`` back-to-back
      windows of ``window_s`` (``timing.window``); ``on_window_start(i)`` is called at the start
      of window ``i`` and ``on_window_end(i)`` at its end, once each, in order start(0) end(0)
      start(1) end(1) …, so a target can bracket the same interval
      (``Target.begin_window``/``end_window``);
    - ``progress(phase, fraction)``, if given, is called with phase ``"warmup"`` or ``"measure"``
      (``"measure i/n"`` for several windows) and a fraction 0..1, at least once per phase;
    - returns one :class:`LoadResult` per window, in order, each over its own window only;
    - raises ``TrialFailed(FailReason.LOAD, …)`` when the load itself fails (did not start, died,
      timed out after ``timeout_s``, recorded nothing); an unreachable URL is not a failure but
      an error rate of 1;
    - ``stop_after(i, result)``, if given, is called right after ``on_window_end(i)`` with that
      window's result; when it returns ``True`` the run ends there and returns the results so
      far (early abort: the remaining windows are not run);
    - on any exception, ``KeyboardInterrupt`` and exceptions from the callbacks included, it stops
      and removes everything it started before re-raising.

    Not thread-safe: one run at a time.
    """

    def run(self, url: str, load: LoadSpec, *, warmup_s: float, window_s: float, windows: int,
            on_window_start: WindowFn, on_window_end: WindowFn, progress: ProgressFn | None = None,
            timeout_s: float | None = None, stop_after: StopFn | None = None) -> list[LoadResult]:
        """One warm-up and ``windows`` measured windows of ``load`` against ``url``."""
        ...


class LocustDriver:
    """Locust in its own process (see :func:`run_load_windows`) with ``locustfile`` (default: the
    built-in paced one; a study uses its spec's ``load.locustfile``)."""

    def __init__(self, locustfile: Path | None = None) -> None:
        self.locustfile = locustfile or BUILTIN_LOCUSTFILE

    def run(self, url: str, load: LoadSpec, *, warmup_s: float, window_s: float, windows: int,
            on_window_start: WindowFn, on_window_end: WindowFn, progress: ProgressFn | None = None,
            timeout_s: float | None = None, stop_after: StopFn | None = None) -> list[LoadResult]:
        """See :class:`LoadDriver`."""
        return run_load_windows(url, load, self.locustfile, warmup_s=warmup_s, window_s=window_s, windows=windows,
                                on_window_start=on_window_start, on_window_end=on_window_end,
                                progress=progress, timeout_s=timeout_s, stop_after=stop_after)
