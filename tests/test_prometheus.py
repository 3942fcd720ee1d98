"""PrometheusReader against a real Prometheus holding series whose answers are known by hand.

The backfilled data (every 5 s from T0 to T0+600, evaluated over [T0+300, T0+600]):

* istio-proxy CPU counters of the trial's ReplicaSet ``backend-abc123`` grow at exactly 0.10 and
  0.15 cores; a terminating pod of the previous ReplicaSet (``backend-old999-y1``) at 0.5 cores,
  plus pod-level/pause/app-container series and another namespace that must all stay out;
* a server-side (``reporter="destination"``) latency histogram split over both pods whose
  per-second cumulative bucket counts are le=1:10, 5:50, 10:80, 25:90, 50:98, 100:100, +Inf:100,
  and a client-side (``reporter="source"``) histogram with other numbers that must stay out.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from _prometheus import backfilled_prometheus, free_port, scraping_prometheus, wait_for_data
from autotune.errors import TargetError, TrialFailed
from autotune.metrics import PrometheusReader
from autotune.metrics._prometheus import SIDECAR_CPU_SAMPLES, pods_pattern, promql_string, render
from autotune.spec import PrometheusSpec

T0 = 1_700_000_000  # fixed, so every number below is deterministic
STEP = 5
END = T0 + 600
START = T0 + 300
NS = "staging"

#: Cumulative requests/s per bucket (server side); p95 and p99 are computed by hand below.
BUCKETS = [("1", 10.0), ("5", 50.0), ("10", 80.0), ("25", 90.0), ("50", 98.0), ("100", 100.0), ("+Inf", 100.0)]
#: Prometheus interpolates linearly inside the bucket holding rank q·total (histogram_quantile):
#: p95: rank 95 is in (25, 50] holding ranks 90…98 → 25 + (50 − 25)·(95 − 90)/(98 − 90) = 40.625 ms
#: p99: rank 99 is in (50, 100] holding ranks 98…100 → 50 + (100 − 50)·(99 − 98)/(100 − 98) = 75 ms
P95_MS = 25 + (50 - 25) * (95 - 90) / (98 - 90)
P99_MS = 50 + (100 - 50) * (99 - 98) / (100 - 98)


def _labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kw.items()) + "}"


def _openmetrics() -> str:
    times = range(T0, END + 1, STEP)
    out = ["# TYPE container_cpu_usage_seconds counter"]
    cpu = [
        (dict(namespace=NS, pod="backend-abc123-x1", container="istio-proxy"), 0.10),
        (dict(namespace=NS, pod="backend-abc123-x2", container="istio-proxy"), 0.15),
        (dict(namespace=NS, pod="backend-old999-y1", container="istio-proxy"), 0.50),  # terminating
        (dict(namespace=NS, pod="backend-abc123-x1", container="backend"), 2.0),  # the app
        (dict(namespace=NS, pod="backend-abc123-x1", container=""), 2.1),  # pod level
        (dict(namespace=NS, pod="backend-abc123-x1", container="POD"), 0.01),  # pause
        (dict(namespace="other", pod="backend-abc123-x1", container="istio-proxy"), 3.0),
        (dict(namespace=NS, pod="backendx-abc123-z1", container="istio-proxy"), 4.0),
    ]
    for labels, cores in cpu:
        # A large start value: no extrapolation stop at a counter's zero point.
        out += [f"container_cpu_usage_seconds_total{_labels(**labels)} {1000 + cores * (t - T0):.6f} {t}"
                for t in times]
    out.append("# TYPE container_cpu_cfs_periods counter")
    for pod in ("backend-abc123-x1", "backend-abc123-x2"):
        lab = _labels(namespace=NS, pod=pod, container="istio-proxy")
        out += [f"container_cpu_cfs_periods_total{lab} {10 * (t - T0)} {t}" for t in times]  # 10 periods/s
    out.append("# TYPE container_cpu_cfs_throttled_periods counter")
    for pod, per_s in (("backend-abc123-x1", 1.0), ("backend-abc123-x2", 3.0)):
        lab = _labels(namespace=NS, pod=pod, container="istio-proxy")
        out += [f"container_cpu_cfs_throttled_periods_total{lab} {per_s * (t - T0)} {t}" for t in times]
    out.append("# TYPE istio_request_duration_milliseconds histogram")
    series = [
        (dict(reporter="destination", destination_workload_namespace=NS, destination_workload="backend",
              pod="backend-abc123-x1"), 0.4, 1.0),
        (dict(reporter="destination", destination_workload_namespace=NS, destination_workload="backend",
              pod="backend-abc123-x2"), 0.6, 1.0),
        # Client-side view, much slower (queueing): must not enter the server-side quantile.
        (dict(reporter="source", destination_workload_namespace=NS, destination_workload="backend",
              pod="loadgen-1-a"), 1.0, 0.0),
    ]
    for labels, share, fast in series:
        for t in times:
            el = t - T0
            for le, per_s in BUCKETS:
                rate = share * per_s if fast else (0.0 if le != "+Inf" else 100.0)
                out.append(f"istio_request_duration_milliseconds_bucket{_labels(**labels, le=le)} {rate * el} {t}")
            out.append(f"istio_request_duration_milliseconds_count{_labels(**labels)} {share * 100 * el} {t}")
            out.append(f"istio_request_duration_milliseconds_sum{_labels(**labels)} {share * 2000 * el} {t}")
    out.append("# EOF")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def prom_url() -> Iterator[str]:
    with backfilled_prometheus(_openmetrics()) as url:
        yield url


def _reader(url: str, **kw: object) -> PrometheusReader:
    return PrometheusReader(PrometheusSpec.model_validate({"url": url, "scrapeInterval": "5s", "timeout": 10, **kw}))


def test_sidecar_cpu_is_the_sum_over_the_trials_replicaset(prom_url: str) -> None:
    cores = _reader(prom_url).sidecar_cpu_cores(NS, "backend", "abc123", START, END)
    assert cores == pytest.approx(0.25, rel=1e-6)


def test_hash_scoping_keeps_the_terminating_pod_out(prom_url: str) -> None:
    reader = _reader(prom_url)
    # Without the hash every ReplicaSet of the Deployment counts, the old pod's 0.5 cores too.
    assert reader.sidecar_cpu_cores(NS, "backend", None, START, END) == pytest.approx(0.75, rel=1e-6)
    assert reader.sidecar_cpu_cores(NS, "backend", "old999", START, END) == pytest.approx(0.5, rel=1e-6)
    # A shorter window inside the data gives the same steady rate.
    assert reader.sidecar_cpu_cores(NS, "backend", "abc123", END - 60, END) == pytest.approx(0.25, rel=1e-6)


def test_throttled_ratio(prom_url: str) -> None:
    reader = _reader(prom_url)
    # (1 + 3) throttled periods/s over (10 + 10) periods/s.
    assert reader.throttled_ratio(NS, "backend", "abc123", START, END) == pytest.approx(0.2, rel=1e-6)
    assert reader.throttled_ratio(NS, "backend", "old999", START, END) is None  # no CPU limit → no data


def test_server_latency_quantiles_match_histogram_quantile_by_hand(prom_url: str) -> None:
    reader = _reader(prom_url)
    assert P95_MS == 40.625 and P99_MS == 75.0
    assert reader.server_latency_ms(NS, "backend", 0.95, START, END) == pytest.approx(P95_MS, rel=1e-9)
    assert reader.server_latency_ms(NS, "backend", 0.99, START, END) == pytest.approx(P99_MS, rel=1e-9)
    # p50: rank 50 is exactly the top of (1, 5] → 5 ms.
    assert reader.server_latency_ms(NS, "backend", 0.5, START, END) == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="quantile"):
        reader.server_latency_ms(NS, "backend", 95, START, END)


def test_empty_result_names_the_query(prom_url: str) -> None:
    reader = _reader(prom_url)
    with pytest.raises(TrialFailed) as info:
        reader.sidecar_cpu_cores(NS, "frontend", "abc123", START, END)
    assert info.value.reason == "metrics"
    # raw samples from one scrape interval (5 s) + 1 s before START to 5 s + 1 s after END
    expected = render(SIDECAR_CPU_SAMPLES, window_s=312, namespace=NS, pods=pods_pattern("frontend", "abc123"))
    assert str(info.value) == f"metrics: query returned no data: {expected}"
    assert 'pod=~"frontend-abc123-.*"' in expected and "[312s]" in expected
    # Outside the data (a window after it ended) there is nothing either.
    with pytest.raises(TrialFailed, match="no data"):
        reader.server_latency_ms(NS, "backend", 0.95, END + 3600, END + 3900)


def test_label_values_are_escaped(prom_url: str) -> None:
    reader = _reader(prom_url)
    # Quotes, backslashes and regex metacharacters reach Prometheus as literal text: a valid query
    # that matches nothing, never a syntax error or an injected matcher.
    for ns, wl, h in (('x", namespace=~".*', "backend", "abc123"), ("staging", "back.nd", "abc123"),
                      ("staging", "backend", ".*"), ("a\\b", 'c"d', "e\nf")):
        with pytest.raises(TrialFailed, match="no data"):
            reader.sidecar_cpu_cores(ns, wl, h, START, END)
    assert pods_pattern("back.nd", "a+b") == "back\\.nd-a\\+b-.*"
    assert promql_string('a"b\\c') == 'a\\"b\\\\c'


def test_short_window_is_warned_about(prom_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="autotune.metrics._prometheus"):
        cores = _reader(prom_url).sidecar_cpu_cores(NS, "backend", "abc123", END - 15, END)
    assert cores == pytest.approx(0.25, rel=1e-6)
    assert any("shorter than 4 × the scrape interval" in r.getMessage() for r in caplog.records)


def test_check_passes_on_prometheus(prom_url: str) -> None:
    _reader(prom_url).check()


def test_prometheus_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reader = _reader(url)
    with pytest.raises(TrialFailed) as info:
        reader.sidecar_cpu_cores(NS, "backend", "abc123", START, END)
    assert info.value.reason == "metrics"
    assert str(info.value).startswith(f"metrics: Prometheus at {url} unreachable: ")
    assert "refused" in str(info.value).lower()
    with pytest.raises(TargetError, match=f"Prometheus at {url} unreachable"):
        reader.check()


class _Recorder(http.server.ThreadingHTTPServer):
    """A reverse proxy in front of Prometheus that records the Authorization header it gets and
    answers 401 unless it is the expected one; or, without an upstream, a plain web page."""

    daemon_threads = True

    def __init__(self, upstream: str | None, token: str) -> None:
        self.upstream, self.token = upstream, token
        self.seen: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _RecorderHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecorderHandler(http.server.BaseHTTPRequestHandler):
    server: _Recorder

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        self.server.seen.append(auth)
        if self.server.upstream is None:
            self._send(200, b"<html>not prometheus</html>", "text/html")
        elif auth != f"Bearer {self.server.token}":
            self._send(401, b"Unauthorized\n", "text/plain")
        else:
            with urllib.request.urlopen(self.server.upstream + self.path, timeout=10) as resp:
                self._send(resp.status, resp.read(), resp.headers.get("Content-Type", "application/json"))

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def recorder(prom_url: str) -> Iterator[_Recorder]:
    server = _Recorder(prom_url, "s3cr3t-tok3n-AAA")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_bearer_token_is_sent_and_never_logged(recorder: _Recorder, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-tok3n-AAA\n")
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        reader = _reader(recorder.url, tokenFile=str(token_file))
        reader.check()
        assert reader.sidecar_cpu_cores(NS, "backend", "abc123", START, END) == pytest.approx(0.25, rel=1e-6)
        assert recorder.seen[-1] == "Bearer s3cr3t-tok3n-AAA"
        # Read at every call: a rotated token is used at once, and a refused one fails the trial.
        token_file.write_text("s3cr3t-tok3n-BBB")
        with pytest.raises(TrialFailed) as info:
            reader.sidecar_cpu_cores(NS, "backend", "abc123", START, END)
        assert recorder.seen[-1] == "Bearer s3cr3t-tok3n-BBB"
        texts.append(str(info.value))
        assert "HTTP 401" in str(info.value) and "token" in str(info.value)
        with pytest.raises(TargetError) as check_info:
            reader.check()
        texts.append(str(check_info.value))
        # From an environment variable.
        monkeypatch.setenv("PROM_TOKEN", "s3cr3t-tok3n-AAA")
        env_reader = _reader(recorder.url, tokenEnv="PROM_TOKEN")
        assert env_reader.server_latency_ms(NS, "backend", 0.95, START, END) == pytest.approx(P95_MS)
        assert recorder.seen[-1] == "Bearer s3cr3t-tok3n-AAA"
        monkeypatch.delenv("PROM_TOKEN")
        with pytest.raises(TrialFailed, match="PROM_TOKEN is unset") as env_info:
            env_reader.server_latency_ms(NS, "backend", 0.95, START, END)
        texts.append(str(env_info.value))
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.args) for r in caplog.records]
    assert caplog.records, "debug logging should have recorded the queries"
    assert not [t for t in texts if "s3cr3t" in t]


def test_no_token_sends_no_header(recorder: _Recorder) -> None:
    with pytest.raises(TrialFailed, match="HTTP 401"):
        _reader(recorder.url).sidecar_cpu_cores(NS, "backend", "abc123", START, END)
    assert recorder.seen and recorder.seen[-1] is None


def test_check_rejects_something_that_is_not_prometheus() -> None:
    server = _Recorder(None, "")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(TargetError, match=f"{server.url} does not look like Prometheus"):
            _reader(server.url).check()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _CadvisorHandler(http.server.BaseHTTPRequestHandler):
    """cAdvisor-like exposition: one istio-proxy counter growing at exactly 0.2 cores."""

    started = time.time()

    def do_GET(self) -> None:
        used = 0.2 * (time.time() - self.started)
        body = ("# TYPE container_cpu_usage_seconds_total counter\n"
                f'container_cpu_usage_seconds_total{{namespace="{NS}",pod="backend-abc123-x1",'
                f'container="istio-proxy"}} {100 + used:.6f}\n').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_scraping_mode_smoke() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CadvisorHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with scraping_prometheus([f"127.0.0.1:{server.server_address[1]}"], interval_s=0.5) as url:
            wait_for_data(url, 'container_cpu_usage_seconds_total{container="istio-proxy"}', samples=6)
            reader = PrometheusReader(PrometheusSpec(url=url, scrape_interval=0.5, timeout=10))
            end = time.time()
            cores = reader.sidecar_cpu_cores(NS, "backend", "abc123", end - 2.0, end)
            assert cores == pytest.approx(0.2, rel=0.15)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _prometheus_children() -> list[int]:
    procs = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if p.name() == "prometheus":
                procs.append(p.pid)
    return procs


def test_prometheus_is_stopped_after_use() -> None:
    before = _prometheus_children()  # the module's backfilled one may be running
    with backfilled_prometheus("# TYPE up gauge\nup 1 1700000000\n") as url, \
            urllib.request.urlopen(f"{url}/-/ready", timeout=5) as resp:
        assert resp.status == 200
        (pid,) = set(_prometheus_children()) - set(before)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _prometheus_children() == before
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{url}/-/ready", timeout=2)
