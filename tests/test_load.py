"""The load runner against a real Locust and a real HTTP server on 127.0.0.1.

Decision recorded here: an unreachable target is *not* a TrialFailed — every request is recorded
as a failure (status ``"error"``), so the result has error rate 1.0 and the study's
``maxErrorRate`` constraint marks the trial infeasible.
"""

from __future__ import annotations

import http.server
import itertools
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from autotune.errors import TrialFailed
from autotune.load import BUILTIN_LOCUSTFILE, LoadResult, LocustDriver
from autotune.load import _locust as _runner
from autotune.spec import LoadSpec

BUILTIN = BUILTIN_LOCUSTFILE
SERVICE_S = 0.020
STALL_S = 1.0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else Nagle + delayed ACK add ~40 ms to every response

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        with server.lock:
            server.hits += 1
            n = server.hits
            if self.path.startswith("/stall") and server.stall_at is not None and time.time() >= server.stall_at:
                server.stall_at, server.stall_until = None, time.time() + STALL_S  # once
        if self.path.startswith("/stall"):
            time.sleep(max(0.0, server.stall_until - time.time()) + 0.001)
        else:
            time.sleep(SERVICE_S)
        status = 503 if self.path.startswith("/flaky") and n % 4 == 0 else 200
        body = b"ok" if status == 200 else b"no healthy upstream"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits = 0
        #: ``/stall``: the first request at or after this wall-clock time stalls every request
        #: for ``STALL_S`` (a GC pause, a failover); the others take 1 ms.
        self.stall_at: float | None = None
        self.stall_until = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _run(url: str, load: LoadSpec, locustfile: Path = BUILTIN, *, warmup: float = 0.5, window: float = 1.5,
         **kw: Any) -> LoadResult:
    """One window through the Locust driver (``warmup``/``window`` in seconds)."""
    kw.setdefault("warmup_s", warmup)
    kw.setdefault("window_s", window)
    kw.setdefault("on_window_start", lambda _i: None)
    kw.setdefault("on_window_end", lambda _i: None)
    (result,) = LocustDriver(locustfile).run(url, load, windows=1, **kw)
    return result


def _locust_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "locust" in " ".join(p.cmdline()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


# --- pure helpers ---------------------------------------------------------------------------


def _unscheduled(n: int) -> dict[str, Any]:
    """Records of a locustfile without a schedule (no due times)."""
    return {"dues": np.full(n, np.nan), "slots": np.ones(n, dtype=np.int64), "period": 0.0}


def test_corrected_latency_counts_from_the_schedule_and_the_dropped_slots() -> None:
    """A user with a 100 ms period: on time, on time, then a request due at 0.2 s sent after its
    user was stuck until 0.75 s (slots 0.2, 0.3, 0.4, 0.5 dropped: it stands for 5 slots up to
    0.6 s; it answers at 0.76 s), then on time again."""
    recs = _runner._Records(
        ends=np.array([0.005, 0.105, 0.76, 0.805]), latencies_ms=np.array([5.0, 5.0, 10.0, 5.0]),
        statuses=np.array([200] * 4, dtype=np.int32), failed=np.zeros(4, dtype=bool), truncated=False,
        dues=np.array([0.0, 0.1, 0.2, 0.8]), slots=np.array([1, 1, 5, 1]), period=0.1,
    )
    r = _runner._summarise(recs, 0.0, 1.0, offered_rps=10.0)
    assert r.latency_p99_ms == pytest.approx(np.percentile([5.0, 5.0, 10.0, 5.0], 99))  # raw: 10 ms at most
    corrected = [5.0, 5.0, 560.0, 460.0, 360.0, 260.0, 160.0, 5.0]  # end - each slot, ms
    assert r.latency_p99_corrected_ms == pytest.approx(np.percentile(corrected, 99))
    assert r.latency_p50_corrected_ms == pytest.approx(np.percentile(corrected, 50))
    # Per request (goodput within an SLO): each from its own slot (the late one's is 0.6 s).
    assert r.ok_latencies_ms == pytest.approx((5.0, 5.0, 5.0, 160.0))
    assert r.goodput_slo_rps(100.0) == 3.0 and r.goodput_rps == 4.0


def test_summarise_filters_to_window_and_counts_non_2xx_as_failures() -> None:
    recs = _runner._Records(
        ends=np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.5]),
        latencies_ms=np.array([99.0, 10.0, 20.0, 30.0, 5.0, 99.0]),
        statuses=np.array([200, 200, 503, 200, 0, 200], dtype=np.int32),
        # the 503 is *not* flagged: the runner must still count it as a failure
        failed=np.array([0, 0, 0, 0, 1, 0], dtype=bool),
        truncated=False, **_unscheduled(6),
    )
    r = _runner._summarise(recs, 1.0, 3.0, offered_rps=2.0)
    assert (r.requests, r.failures, r.window_s) == (4, 2, 2.0)
    assert r.achieved_rps == 2.0
    assert r.status_counts == {"200": 2, "503": 1, "error": 1}
    assert r.latency_p50_ms == 20.0  # of the successes 10 and 30 only
    assert r.error_rate == 0.5


def test_summarise_without_successes_gives_nan_percentiles() -> None:
    recs = _runner._Records(
        ends=np.array([1.0, 2.0]), latencies_ms=np.array([1.0, 1.0]),
        statuses=np.array([0, 503], dtype=np.int32), failed=np.array([1, 1], dtype=bool),
        truncated=False, **_unscheduled(2),
    )
    r = _runner._summarise(recs, 0.0, 3.0, offered_rps=1.0)
    assert r.error_rate == 1.0
    assert all(math.isnan(v) for v in (r.latency_p50_ms, r.latency_p95_ms, r.latency_p99_ms))


# --- real Locust ----------------------------------------------------------------------------


@pytest.mark.slow
def test_paced_load_measures_the_window_only(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: list[_runner._Records] = []
    real = _runner._summarise

    def spy(records: _runner._Records, *a: Any, **kw: Any) -> LoadResult:
        captured.append(records)
        return real(records, *a, **kw)

    monkeypatch.setattr(_runner, "_summarise", spy)
    load = LoadSpec(users=5, rate_per_user=20, path="/ok")
    events: list[tuple[str, float]] = []
    progress: list[tuple[str, float, float]] = []
    t0 = time.monotonic()
    r = _run(
        server.url, load, warmup=1, window=3,
        on_window_start=lambda i: events.append((f"start {i}", time.monotonic())),
        on_window_end=lambda i: events.append((f"end {i}", time.monotonic())),
        progress=lambda phase, f: progress.append((phase, f, time.monotonic())),
    )

    # (a) the offered load is achieved and latencies are real, ordered and fine-grained
    assert r.offered_rps == 100.0
    assert r.achieved_rps == pytest.approx(100.0, rel=0.15)
    assert r.failures == 0 and r.status_counts == {"200": r.requests}
    assert r.latency_p50_ms >= SERVICE_S * 1000
    assert r.latency_p99_ms >= r.latency_p95_ms >= r.latency_p50_ms
    lat = captured[0].latencies_ms
    assert np.any(lat != np.round(lat)), "latencies must keep sub-millisecond resolution"

    # (b) warm-up requests are excluded: ≈ rate × window, while the server saw more
    assert r.requests == pytest.approx(100 * 3, rel=0.15)
    assert server.hits - r.requests >= 0.5 * 100 * 1.0
    assert r.window_s == pytest.approx(3.0, abs=0.15)

    # (d) each callback once, in order, warm-up after the load started and duration apart
    assert [e for e, _ in events] == ["start 0", "end 0"]
    started, ended = events[0][1], events[1][1]
    assert 1.0 <= started - t0 <= 1.0 + 5.0  # warm-up plus Locust's start-up
    assert ended - started == pytest.approx(3.0, abs=0.15)

    # progress: both phases, fractions 0..1 rising, reported at least once a second
    phases = [p for p, _, _ in progress]
    assert phases.index("measure") > phases.index("warmup")
    assert all(0.0 <= f <= 1.0 for _, f, _ in progress)
    measure = [f for p, f, _ in progress if p == "measure"]
    assert measure == sorted(measure) and measure[-1] == 1.0
    times = [t for _, _, t in progress]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 1.0
    assert not _locust_children()


@pytest.mark.slow
def test_back_to_back_windows_each_measure_their_own_span(server: _Server) -> None:
    load = LoadSpec(users=2, rate_per_user=20, path="/ok")
    events: list[tuple[str, float]] = []
    results = LocustDriver().run(
        server.url, load, warmup_s=0.5, window_s=1.5, windows=2,
        on_window_start=lambda i: events.append((f"start {i}", time.time())),
        on_window_end=lambda i: events.append((f"end {i}", time.time())),
    )
    assert [e for e, _ in events] == ["start 0", "end 0", "start 1", "end 1"]
    assert events[2][1] - events[1][1] < 0.05  # back to back: no gap between the windows
    assert len(results) == 2
    for r in results:
        assert r.window_s == pytest.approx(1.5, abs=0.1)
        assert r.requests == pytest.approx(40 * 1.5, rel=0.2) and r.failures == 0
    assert not _locust_children()


@pytest.mark.slow
def test_503s_count_as_failures(server: _Server) -> None:
    load = LoadSpec(users=2, rate_per_user=20, path="/flaky")
    r = _run(server.url, load, window=2)
    assert r.status_counts.get("503", 0) > 0
    assert r.failures == r.status_counts["503"]
    assert r.requests == r.status_counts["503"] + r.status_counts["200"]
    assert r.error_rate == pytest.approx(0.25, abs=0.08)
    assert r.latency_p50_ms >= SERVICE_S * 1000


@pytest.mark.slow
def test_keyboard_interrupt_leaves_no_locust_behind(server: _Server) -> None:
    seen: dict[str, Any] = {}

    def interrupt(_i: int) -> None:
        kids = _locust_children()
        seen["pids"] = [p.pid for p in kids]
        seen["workdir"] = Path(kids[0].environ()["AUTOTUNE_MARKER"]).parent
        raise KeyboardInterrupt

    load = LoadSpec(users=2, rate_per_user=10, path="/ok")
    with pytest.raises(KeyboardInterrupt):
        _run(server.url, load, window=5, on_window_start=interrupt)
    assert seen["pids"]
    for pid in seen["pids"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not _locust_children()
    assert not seen["workdir"].exists()


@pytest.mark.slow
def test_unreachable_target_gives_error_rate_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = LoadSpec(users=2, rate_per_user=10)
    r = _run(f"http://127.0.0.1:{port}", load)
    assert r.requests > 0
    assert r.error_rate == 1.0
    assert set(r.status_counts) == {"error"}
    assert math.isnan(r.latency_p50_ms)


@pytest.mark.slow
def test_custom_locustfile_importing_the_recorder(server: _Server, tmp_path: Path) -> None:
    custom = tmp_path / "my_locustfile.py"
    custom.write_text(
        "import autotune.load.locustfile  # noqa: F401\n"
        "from locust import FastHttpUser, constant_throughput, task\n"
        "class Mine(FastHttpUser):\n"
        "    wait_time = constant_throughput(20)\n"
        "    @task\n"
        "    def t(self):\n"
        "        self.client.get('/custom')\n"
    )
    load = LoadSpec(users=1, rate_per_user=20)
    r = _run(server.url, load, custom)
    # Only the custom user ran (a star import would have added PacedUser's load too).
    assert r.achieved_rps == pytest.approx(20, rel=0.25)
    assert r.failures == 0


@pytest.mark.slow
def test_locustfile_that_does_not_record_fails_the_trial(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_runner, "START_TIMEOUT_S", 3.0)
    custom = tmp_path / "plain.py"
    custom.write_text(
        "from locust import FastHttpUser, constant, task\n"
        "class Plain(FastHttpUser):\n"
        "    wait_time = constant(1)\n"
        "    @task\n"
        "    def t(self):\n"
        "        self.client.get('/')\n"
    )
    with pytest.raises(TrialFailed, match=r"import autotune\.load\.locustfile") as info:
        _run(server.url, LoadSpec(users=1), custom, warmup=0, window=1)
    assert info.value.reason == "load"
    assert not _locust_children()


@pytest.mark.slow
def test_broken_locustfile_fails_with_stderr_tail(server: _Server, tmp_path: Path) -> None:
    custom = tmp_path / "broken.py"
    custom.write_text("raise RuntimeError('boom in locustfile')\n")
    with pytest.raises(TrialFailed, match="boom in locustfile") as info:
        _run(server.url, LoadSpec(users=1), custom, warmup=0, window=1)
    assert info.value.reason == "load"


def test_missing_locustfile_fails(tmp_path: Path) -> None:
    with pytest.raises(TrialFailed):
        _run("http://127.0.0.1:1", LoadSpec(), tmp_path / "nope.py")


@pytest.mark.slow
def test_corrected_latency_shows_a_stall_the_raw_latency_hides(server: _Server) -> None:
    """One paced user at 50 requests/s; the server stalls once for 1 s in the middle of a 4 s
    window. Raw: one request of ~1 s among ~150 (p99 stays low). Corrected for coordinated
    omission: the ~50 requests the schedule wanted sent during the stall waited too."""
    load = LoadSpec(users=1, rate_per_user=50, path="/stall")
    result = _run(server.url, load, warmup=0.5, window=4.0,
                  on_window_start=lambda _i: setattr(server, "stall_at", time.time() + 1.5))
    print(f"raw p50/p95/p99 {result.latency_p50_ms:.1f}/{result.latency_p95_ms:.1f}/"
          f"{result.latency_p99_ms:.1f} ms; corrected {result.latency_p50_corrected_ms:.1f}/"
          f"{result.latency_p95_corrected_ms:.1f}/{result.latency_p99_corrected_ms:.1f} ms; "
          f"{result.requests} requests")
    assert server.stall_at is None  # the stall happened
    assert result.latency_p99_ms < 100.0  # the raw p99 does not see it
    assert result.latency_p99_corrected_ms > 800.0  # the corrected one does
    assert result.latency_p95_corrected_ms > 300.0 > result.latency_p95_ms
    assert result.latency_p50_corrected_ms < 20.0  # most requests were on time either way
    assert max(result.ok_latencies_ms) > 900.0  # the stalled request itself, from its slot


@pytest.mark.slow
def test_stop_after_ends_the_run_after_the_window_it_says(server: _Server) -> None:
    """Early abort on real Locust: the records of window 0 are read while the load runs; asked
    to stop there, the run skips its two other windows."""
    seen: list[tuple[int, LoadResult]] = []

    def stop_after(i: int, result: LoadResult) -> bool:
        seen.append((i, result))
        return result.error_rate > 0.1

    ends: list[int] = []
    t0 = time.monotonic()
    results = LocustDriver().run(server.url, LoadSpec(users=4, rate_per_user=20, path="/flaky"),
                                 warmup_s=0.5, window_s=1.5, windows=3, on_window_start=lambda _i: None,
                                 on_window_end=ends.append, stop_after=stop_after)
    elapsed = time.monotonic() - t0
    assert len(results) == 1 and ends == [0] and [i for i, _ in seen] == [0]
    assert results[0].error_rate == pytest.approx(0.25, abs=0.1)  # every 4th /flaky request fails
    assert seen[0][1].requests <= results[0].requests  # read mid-run: what had finished by then
    assert elapsed < 0.5 + 3 * 1.5  # the other two windows were not run
    assert not _locust_children()
