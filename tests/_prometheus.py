"""A real Prometheus for tests: backfilled with known series, or scraping local endpoints.

    from _prometheus import backfilled_prometheus, scraping_prometheus, wait_for_data

    with backfilled_prometheus(openmetrics_text) as url:   # "http://127.0.0.1:<port>"
        ...
    with scraping_prometheus(["127.0.0.1:8000", "http://127.0.0.1:8001/metrics/cadvisor"]) as url:
        wait_for_data(url, 'container_cpu_usage_seconds_total', samples=3)
        ...

Both run Debian's ``prometheus`` (and ``promtool`` for backfilling) on 127.0.0.1 with a free port and
a temporary data dir, stop the process by its PID and remove the directory on exit. Without the
binaries the test is skipped, unless ``CI`` is set: CI installs them (.ci/run), so there it fails.
The pytest fixtures ``prometheus_backfill`` and ``prometheus_scrape`` wrap the two as factories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

START_TIMEOUT_S = 30.0


def require_binaries() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; skip (or fail under CI) when missing."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return prom, tool
    reason = "the prometheus/promtool binaries are not installed (apt-get install prometheus)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install them (.ci/run)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def query(url: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query's ``data.result`` (no auth; for tests' own checks)."""
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    body = _get_json(f"{url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10)
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for_data(url: str, promql: str, samples: int = 1, timeout: float = 20.0) -> None:
    """Wait until Prometheus holds at least ``samples`` scraped samples of every series
    ``promql`` selects (a plain selector such as ``foo{pod="x"}``)."""
    deadline = time.monotonic() + timeout
    last: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        last = query(url, f"min(count_over_time({promql}[10m]))")
        if last and float(last[0]["value"][1]) >= samples:
            return
        time.sleep(0.25)
    raise AssertionError(f"Prometheus at {url} has fewer than {samples} samples of {promql} after {timeout}s: {last}")


@contextlib.contextmanager
def _run(config: dict[str, Any], data_dir: Path, work: Path) -> Iterator[str]:
    """Start prometheus on a free loopback port with ``config``; yield its URL; stop it by PID."""
    prom, _ = require_binaries()
    config_file = work / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    for _attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = work / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [prom, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
                 f"--web.listen-address=127.0.0.1:{port}",
                 # Backfilled blocks may be old; retention is counted from the newest block, and a
                 # long one keeps any test data queryable.
                 "--storage.tsdb.retention.time=100y",
                 "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work,
            )
        try:
            ready = False
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                        ready = resp.status == 200
                except (urllib.error.URLError, OSError):
                    pass
                if ready:
                    break
                time.sleep(0.1)
            if not ready:
                text = log_path.read_text(errors="replace")
                if proc.poll() is not None and "address already in use" in text:
                    continue  # lost the port race: try another
                raise RuntimeError(f"prometheus did not become ready on {url}:\n{text[-3000:]}")
            yield url
            return
        finally:
            _stop(proc)
    raise RuntimeError("prometheus could not bind a free port in 3 attempts")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # by PID
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def backfilled_prometheus(openmetrics_text: str) -> Iterator[str]:
    """A Prometheus serving exactly the series in ``openmetrics_text`` (OpenMetrics with
    timestamps in seconds; ``# EOF`` is appended if missing). Scrapes nothing."""
    _, promtool = require_binaries()
    with tempfile.TemporaryDirectory(prefix="autotune-prom-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        text = openmetrics_text.rstrip() + "\n"
        if not text.endswith("# EOF\n"):
            text += "# EOF\n"
        source = work / "backfill.om"
        source.write_text(text)
        done = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data_dir)],
                              capture_output=True, text=True, timeout=120, cwd=work)
        if done.returncode != 0:
            raise RuntimeError(f"promtool could not backfill:\n{done.stdout}\n{done.stderr}")
        config = {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"}, "scrape_configs": []}
        with _run(config, data_dir, work) as url:
            yield url


def _scrape_job(i: int, target: str, interval_s: float) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
    host = parsed.hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"tests only scrape loopback endpoints, got {target!r}")
    interval = f"{int(interval_s * 1000)}ms"
    return {
        "job_name": f"target-{i}",
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "scheme": parsed.scheme or "http",
        "metrics_path": parsed.path or "/metrics",
        # Keep the exposed namespace/pod/container labels, as the kubelet's cAdvisor job does.
        "honor_labels": True,
        "static_configs": [{"targets": [parsed.netloc]}],
    }


@contextlib.contextmanager
def scraping_prometheus(targets: list[str], interval_s: float = 1) -> Iterator[str]:
    """A Prometheus scraping each target (``127.0.0.1:PORT`` → ``/metrics``, or a full
    ``http://127.0.0.1:PORT/path`` URL) every ``interval_s`` seconds, keeping the targets' labels.
    Prometheus 2.x applies discovered targets on a 5 s tick, so the first scrape comes up to ~5 s
    after the URL is yielded: use :func:`wait_for_data` before querying."""
    with tempfile.TemporaryDirectory(prefix="autotune-prom-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        interval = f"{int(interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [_scrape_job(i, t, interval_s) for i, t in enumerate(targets)],
        }
        with _run(config, data_dir, work) as url:
            yield url


@pytest.fixture
def prometheus_backfill() -> Iterator[Callable[[str], str]]:
    """``url = prometheus_backfill(openmetrics_text)``; stopped at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda text: stack.enter_context(backfilled_prometheus(text))


@pytest.fixture
def prometheus_scrape() -> Iterator[Callable[..., str]]:
    """``url = prometheus_scrape(["127.0.0.1:PORT"], interval_s=1)``; stopped at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda targets, interval_s=1: stack.enter_context(scraping_prometheus(targets, interval_s))
