"""Run one fixed, paced Locust load in its own process and measure it over a window.

Locust is never imported here: it monkey-patches the interpreter with gevent, so it runs as a
``python -m locust`` subprocess in its own session (a terminal Ctrl-C does not reach it; the
runner stops it itself, and kills its whole process group on any error or interrupt).

Timeline of :func:`run_load_windows` (one window shown)::

    spawn ── marker (test_start) ── warm-up ── on_window_start(0) ── duration ── on_window_end(0)
                                                   |<────────── measured window ──────────>|
    ── SIGTERM ── Locust writes its records and exits ── records filtered to the window

The locustfile (see ``autotune/load/locustfile.py``) writes the started marker and the raw
per-request records; the runner computes every figure from those records, never from Locust's
own (rounded) statistics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from autotune._process import child_env, die_with_parent, log_tail, terminate
from autotune.errors import FailReason, TrialFailed
from autotune.load._result import LoadResult
from autotune.spec import LoadSpec

logger = logging.getLogger(__name__)

#: How long Locust may take from spawn to its ``test_start`` marker.
START_TIMEOUT_S = 30.0
#: How long Locust may take to write its records and exit after SIGTERM.
EXIT_TIMEOUT_S = 15.0
#: Extra run time given to Locust's own ``--run-time``; it is only a dead-man stop, since the
#: runner ends the run itself right after the window.
RUN_TIME_MARGIN_S = 15.0
#: How often ``progress`` is called (at most this many seconds apart).
PROGRESS_INTERVAL_S = 0.5
_POLL_S = 0.05

ProgressFn = Callable[[str, float], None]


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"load URL must be http(s)://host[:port], got {url!r}")


@dataclass(frozen=True)
class _Records:
    ends: npt.NDArray[np.float64]
    latencies_ms: npt.NDArray[np.float64]
    statuses: npt.NDArray[np.int32]
    failed: npt.NDArray[np.bool_]
    truncated: bool
    #: Wall-clock time each request's schedule said it was due (NaN: unscheduled), the number of
    #: slots it stands for (1 + slots dropped before it) and the schedule's period (s).
    dues: npt.NDArray[np.float64]
    slots: npt.NDArray[np.int64]
    period: float


def run_load_windows(
    url: str,
    load: LoadSpec,
    locustfile: Path,
    *,
    warmup_s: float,
    window_s: float,
    windows: int,
    on_window_start: Callable[[int], None],
    on_window_end: Callable[[int], None],
    progress: ProgressFn | None = None,
    timeout_s: float | None = None,
    stop_after: Callable[[int, LoadResult], bool] | None = None,
) -> list[LoadResult]:
    """Run ``load`` against ``url`` with ``locustfile``: one warm-up, then ``windows`` back-to-back
    measurement windows of ``window_s`` each; return the figures of each window.

    The callbacks get the window's index; with more than one window the progress phase is
    ``"measure i/n"``.

    Calls ``on_window_start(0)`` ``warmup_s`` after Locust's test start, then for each window
    ``i`` ``on_window_end(i)`` ``window_s`` after ``on_window_start(i)`` and, right after it,
    ``on_window_start(i + 1)``; a window is the wall-clock span
    between the moments just before each callback ran, and only requests that *completed* inside
    it are counted. ``progress(phase, fraction)`` is called at least once a second with phase
    ``"warmup"`` or ``"measure"`` and fraction 0..1.

    ``timeout_s`` bounds the whole run (default: warm-up + duration + 60 s).

    ``stop_after(i, result)``, if given, is called after ``on_window_end(i)`` with window ``i``'s
    figures (Locust is asked for its records so far, ``SIGUSR1``); ``True`` ends the run there.

    Any http(s) URL is accepted: the target decides where load may go (``Target.load_url``).
    Raises ``TrialFailed(FailReason.LOAD, …)`` (with the tail of Locust's stderr) if Locust does not
    start, dies, exits non-zero, runs out of time or records no request. On any exception,
    ``KeyboardInterrupt`` included, Locust's whole process group is killed before re-raising;
    the temporary directory is always removed. Unreachable targets are *not* a failure: their
    requests are recorded as failed (status ``"error"``), so the result has error rate 1.0.
    """
    _check_url(url)
    if not locustfile.is_file():
        raise TrialFailed(FailReason.LOAD, f"locustfile not found: {locustfile}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    budget = timeout_s if timeout_s is not None else warmup_s + windows * window_s + 60.0
    deadline = time.monotonic() + budget

    workdir = Path(tempfile.mkdtemp(prefix="autotune-load-"))
    marker = workdir / "started.json"
    results = workdir / "records.bin"
    stdout_path, stderr_path = workdir / "locust.stdout", workdir / "locust.stderr"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                _command(url, load, locustfile, budget),
                cwd=workdir,
                env=_environment(load, marker, results),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        spawned = time.monotonic()
        logger.debug("Locust pid %d started: %s", proc.pid, proc.args)

        t0 = _wait_for_marker(proc, marker, stderr_path, deadline)
        logger.debug("Locust test started %.2f s after spawn", time.monotonic() - spawned)

        _sleep_until(t0 + warmup_s, t0, warmup_s, "warmup", proc, stderr_path,
                     deadline, progress)
        spans: list[tuple[float, float]] = []
        flushes = 0
        next_start = time.time()
        for i in range(windows):
            window_start = next_start
            on_window_start(i)
            phase = "measure" if windows == 1 else f"measure {i + 1}/{windows}"
            _sleep_until(window_start + window_s, window_start, window_s, phase,
                         proc, stderr_path, deadline, progress)
            window_end = time.time()
            on_window_end(i)
            spans.append((window_start, window_end))
            if stop_after is not None:
                flushes = _flush(proc, results, stderr_path, deadline, flushes)
                window = _summarise(_read_records(results, stderr_path), window_start, window_end,
                                    load.offered_rps)
                if stop_after(i, window):
                    break
            # The next window starts once the callback is back: a target may block in end_window
            # (Kubernetes waits for Prometheus to scrape past the end), and the two must agree.
            next_start = time.time()

        _stop(proc, stderr_path, deadline)
        records = _read_records(results, stderr_path)
        return [_summarise(records, a, b, load.offered_rps) for a, b in spans]
    except BaseException:
        if proc is not None:
            terminate(proc, 2.0, group=True)
        raise
    finally:
        if proc is not None and proc.poll() is None:  # pragma: no cover - belt and braces
            terminate(proc, 2.0, group=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _command(url: str, load: LoadSpec, locustfile: Path, budget_s: float) -> list[str]:
    # Locust's own run time is only a dead-man stop (the runner ends the run after the last
    # window), so it covers the whole budget, time spent in the window callbacks included.
    run_time = math.ceil(budget_s + RUN_TIME_MARGIN_S)
    return [
        sys.executable, "-m", "locust",
        "-f", str(locustfile.resolve()),
        "--headless",
        "-u", str(load.users),
        # All users within ~0.1 s; the locustfile staggers their first requests itself.
        "-r", str(max(load.users * 10, 1)),
        "-t", f"{run_time}s",
        "-H", url,
        "--only-summary",
        "--loglevel", "WARNING",
        "--stop-timeout", "1",
        # Failed requests are data, not a Locust failure: a non-zero exit then means trouble.
        "--exit-code-on-error", "0",
    ]


def _environment(load: LoadSpec, marker: Path, results: Path) -> dict[str, str]:
    # Users' LOCUST_* settings would silently change the load; autotune owns every option.
    # Custom locustfiles `import autotune.load.locustfile`: child_env makes this autotune found.
    env = child_env(drop_prefix="LOCUST_")
    env.update(
        AUTOTUNE_PATH=load.path,
        AUTOTUNE_RATE=repr(load.per_user_rate),
        AUTOTUNE_USERS=str(load.users),
        AUTOTUNE_MARKER=str(marker),
        AUTOTUNE_RESULTS=str(results),
        AUTOTUNE_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _tail(stderr_path: Path) -> str:
    text = log_tail(stderr_path, lines=25, width=400)
    return f"Locust stderr (tail):\n{text}" if text else "Locust wrote nothing to stderr"


def _check_alive(proc: subprocess.Popen[bytes], stderr_path: Path, when: str) -> None:
    code = proc.poll()
    if code is not None:
        raise TrialFailed(FailReason.LOAD, f"Locust exited with code {code} {when}. {_tail(stderr_path)}")


def _check_deadline(deadline: float, stderr_path: Path, when: str) -> None:
    if time.monotonic() > deadline:
        raise TrialFailed(FailReason.LOAD, f"the load run timed out {when}. {_tail(stderr_path)}")


def _wait_for_marker(
    proc: subprocess.Popen[bytes], marker: Path, stderr_path: Path, deadline: float
) -> float:
    """Wait for the locustfile's started marker; return its wall-clock start time."""
    limit = min(deadline, time.monotonic() + START_TIMEOUT_S)
    while True:
        if marker.exists():
            try:
                return float(json.loads(marker.read_text())["start"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TrialFailed(FailReason.LOAD, f"unreadable start marker {marker}: {exc}") from None
        _check_alive(proc, stderr_path, "before the test started")
        if time.monotonic() > limit:
            raise TrialFailed(
                FailReason.LOAD,
                "Locust did not start the test in time (a custom locustfile must "
                "`import autotune.load.locustfile` to be measured). " + _tail(stderr_path),
            )
        time.sleep(_POLL_S)


def _sleep_until(
    until: float, since: float, span: float, phase: str, proc: subprocess.Popen[bytes],
    stderr_path: Path, deadline: float, progress: ProgressFn | None,
) -> None:
    """Sleep until wall-clock ``until``, reporting progress, failing if Locust dies."""
    next_report = 0.0
    while True:
        now = time.time()
        if progress is not None and (now >= next_report or now >= until):
            frac = 1.0 if span <= 0 else min(1.0, max(0.0, (now - since) / span))
            progress(phase, frac)
            next_report = now + PROGRESS_INTERVAL_S
        if now >= until:
            return
        _check_alive(proc, stderr_path, f"during {phase}")
        _check_deadline(deadline, stderr_path, f"during {phase}")
        time.sleep(min(_POLL_S, until - now))


def _stop(proc: subprocess.Popen[bytes], stderr_path: Path, deadline: float) -> None:
    """Ask Locust to stop (SIGTERM: it writes its records and exits); require exit code 0."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    wait = max(1.0, min(EXIT_TIMEOUT_S, deadline - time.monotonic()))
    try:
        code = proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        raise TrialFailed(
            FailReason.LOAD,
            f"Locust did not exit within {wait:.0f} s of being stopped. {_tail(stderr_path)}",
        ) from None
    if code != 0:
        raise TrialFailed(FailReason.LOAD, f"Locust exited with code {code}. {_tail(stderr_path)}")


def _flush(proc: subprocess.Popen[bytes], results: Path, stderr_path: Path, deadline: float,
           seen: int) -> int:
    """Ask the locustfile for its records so far (``SIGUSR1``) and wait until it wrote them;
    return the new write count (the header's ``flush``)."""
    os.kill(proc.pid, signal.SIGUSR1)
    limit = min(deadline, time.monotonic() + EXIT_TIMEOUT_S)
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with results.open("rb") as f:
                flush = int(json.loads(f.readline()).get("flush", 0))
            if flush > seen:
                return flush
        _check_alive(proc, stderr_path, "while writing its records")
        if time.monotonic() > limit:
            raise TrialFailed(FailReason.LOAD, "Locust did not write its records when asked (a custom "
                              f"locustfile must `import autotune.load.locustfile`). {_tail(stderr_path)}")
        time.sleep(_POLL_S / 5)


def _read_records(path: Path, stderr_path: Path) -> _Records:
    """Parse the locustfile's results file (format in ``locustfile.py``)."""
    try:
        blob = path.read_bytes()
    except OSError:
        raise TrialFailed(FailReason.LOAD, f"Locust wrote no results. {_tail(stderr_path)}") from None
    try:
        head_end = blob.index(b"\n")
        header = json.loads(blob[:head_end])
        n = int(header["count"])
        version = header.get("version")
        if version not in (1, 2):
            raise ValueError(f"unknown version {version!r}")
        off = head_end + 1
        ends = np.frombuffer(blob, dtype="<f8", count=n, offset=off)
        off += 8 * n
        lat = np.frombuffer(blob, dtype="<f8", count=n, offset=off)
        off += 8 * n
        statuses = np.frombuffer(blob, dtype="<i4", count=n, offset=off)
        off += 4 * n
        failed = np.frombuffer(blob, dtype=np.uint8, count=n, offset=off)
        off += n
        if version == 2:
            dues = np.frombuffer(blob, dtype="<f8", count=n, offset=off).astype(np.float64)
            off += 8 * n
            slots = np.frombuffer(blob, dtype="<u4", count=n, offset=off).astype(np.int64)
        else:
            dues, slots = np.full(n, np.nan), np.ones(n, dtype=np.int64)
        period = float(header.get("period") or 0.0)
    except (ValueError, KeyError, TypeError) as exc:
        raise TrialFailed(FailReason.LOAD, f"unreadable Locust results: {exc}") from None
    if n == 0:
        raise TrialFailed(FailReason.LOAD, f"Locust recorded no requests. {_tail(stderr_path)}")
    if header.get("truncated"):
        raise TrialFailed(FailReason.LOAD, f"more than {n} requests: the record buffer overflowed")
    return _Records(
        ends=ends.astype(np.float64),
        latencies_ms=lat.astype(np.float64),
        statuses=statuses.astype(np.int32),
        failed=failed.astype(bool),
        truncated=bool(header.get("truncated")),
        dues=dues, slots=np.maximum(slots, 1), period=period,
    )


def _summarise(records: _Records, start: float, end: float, offered_rps: float) -> LoadResult:
    """Figures over requests that completed in ``[start, end]``; non-2xx are always failures."""
    inside = (records.ends >= start) & (records.ends <= end)
    statuses = records.statuses[inside]
    failed = records.failed[inside] | (statuses < 200) | (statuses >= 300)
    ok = np.flatnonzero(inside)[~failed]
    ok = ok[np.isfinite(records.latencies_ms[ok])]
    ok_lat = records.latencies_ms[ok]
    p50, p95, p99 = _percentiles(ok_lat)
    samples, own = _corrected(records, ok)
    c50, c95, c99 = _percentiles(samples) if samples is not None else (math.nan,) * 3
    codes, counts = np.unique(statuses, return_counts=True)
    status_counts = {
        ("error" if int(c) == 0 else str(int(c))): int(k)
        for c, k in zip(codes, counts, strict=True)
    }
    window_s = end - start
    requests = int(inside.sum())
    return LoadResult(
        offered_rps=offered_rps,
        achieved_rps=requests / window_s if window_s > 0 else 0.0,
        requests=requests,
        failures=int(failed.sum()),
        window_s=window_s,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        status_counts=status_counts,
        latency_p50_corrected_ms=c50,
        latency_p95_corrected_ms=c95,
        latency_p99_corrected_ms=c99,
        ok_latencies_ms=tuple(float(v) for v in np.sort(own if own is not None else ok_lat)),
    )


def _percentiles(latencies: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    if not latencies.size:
        return math.nan, math.nan, math.nan
    p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50.0, 95.0, 99.0]))
    return p50, p95, p99


def _corrected(records: _Records, ok: npt.NDArray[np.intp]
               ) -> tuple[npt.NDArray[np.float64] | None, npt.NDArray[np.float64] | None]:
    """Latencies free of coordinated omission of the successful requests ``ok`` (indices):
    ``(samples, own)``. ``samples`` has one latency per schedule slot — a request that stands for
    ``k`` slots (``k - 1`` dropped while its user was stuck) gives ``end - slot_j`` for each of
    them; ``own`` one per request, from its own slot. Unscheduled requests count with their raw
    latency; ``(None, None)`` when no request was scheduled."""
    dues = records.dues[ok]
    scheduled = np.isfinite(dues)
    if not scheduled.any() or records.period <= 0:
        return None, None
    ends, slots, raw = records.ends[ok][scheduled], records.slots[ok][scheduled], records.latencies_ms[ok]
    first = np.repeat(np.cumsum(slots) - slots, slots)
    j = np.arange(int(slots.sum())) - first
    rep = np.repeat(np.arange(slots.size), slots)
    samples = (ends[rep] - dues[scheduled][rep] - j * records.period) * 1000.0
    own = (ends - dues[scheduled] - (slots - 1) * records.period) * 1000.0
    unscheduled = raw[~scheduled]
    # A request is never faster than its own response (clock steps aside).
    own = np.maximum(own, raw[scheduled])
    return np.concatenate([samples, unscheduled]), np.concatenate([own, unscheduled])
