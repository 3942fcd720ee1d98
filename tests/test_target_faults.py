"""Faults on the local target's processes, on real Envoy, real upstreams and real cgroups.

A process autotune starts never outlives it (parent-death signal, a sweep of a crashed run's
leftovers at start); a proxy or upstream that dies during a window fails that trial with its own
reason and ``restore()`` starts it again; a config Envoy does not run fails as ``not-propagated``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from _local import needs_cgroup, needs_envoy
from autotune._process import child_env, die_with_parent
from autotune.errors import FailReason, TrialFailed
from autotune.mesh import MeshConfig
from autotune.spec import LocalTargetSpec, ServiceRef, UpstreamSpec
from autotune.targets._base import Observed
from autotune.targets.local import LocalTarget, _target
from autotune.targets.local._leftovers import state_dir, sweep

SERVICE = ServiceRef(name="backend", namespace="demo", port=8080)
SPEC = LocalTargetSpec(upstream=UpstreamSpec(endpoints=2, service_time_ms=0, response_bytes=128))
TUNED = MeshConfig(max_connections=7, http1_max_pending_requests=9, concurrency=1)

_CHILD = textwrap.dedent("""
    import json, sys, time
    from autotune.spec import LocalTargetSpec, ServiceRef, UpstreamSpec
    from autotune.targets.local import LocalTarget
    t = LocalTarget(LocalTargetSpec(upstream=UpstreamSpec(endpoints=2)),
                    ServiceRef(name="backend", namespace="demo", port=8080))
    t.start()
    print(json.dumps({"pids": t.started_pids, "envoy": t.envoy.pid,
                      "cgroup": [str(d) for d in t.cgroup.dirs], "tmp": str(t._tmp)}), flush=True)
    time.sleep(600)
""")


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_dead(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(_dead(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _dead(p)]


@needs_envoy
@needs_cgroup
def test_a_killed_autotune_takes_envoy_and_the_upstreams_with_it_and_the_next_start_sweeps() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                             env=child_env(), start_new_session=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child target did not start"
        made: dict[str, Any] = json.loads(line)
        assert made["envoy"] in made["pids"] and len(made["pids"]) == 3
        assert all(Path(d).is_dir() for d in made["cgroup"]) and Path(made["tmp"]).is_dir()
        child.send_signal(signal.SIGKILL)  # no atexit, no close(): a crash
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert _wait_dead(made["pids"]) == [], "envoy or an upstream outlived the process that started it"
    # What the kernel does not clean up: the cgroup and the temporary directory.
    assert any(Path(d).is_dir() for d in made["cgroup"]) and Path(made["tmp"]).is_dir()
    t = LocalTarget(SPEC, SERVICE)
    try:
        t.start()
        assert not any(Path(d).exists() for d in made["cgroup"])
        assert not Path(made["tmp"]).exists()
        assert not list(state_dir().glob(f"local-{child.pid}-*.json"))
    finally:
        t.close()


@pytest.mark.skipif(die_with_parent() is None, reason="no parent-death signal on this platform")
@pytest.mark.parametrize("bound", [True, False])
def test_a_child_started_with_die_with_parent_dies_with_its_parent(bound: bool) -> None:
    code = textwrap.dedent(f"""
        import subprocess, time
        from autotune._process import die_with_parent
        p = subprocess.Popen(["sleep", "60"], start_new_session=True,
                             preexec_fn={"die_with_parent()" if bound else "None"})
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=child_env())
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    parent.stdout.close()
    try:
        assert (_wait_dead([grandchild], 3.0) == []) is bound  # the control (unbound) survives
    finally:
        if not _dead(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_the_sweep_kills_a_recorded_leftover_process_but_nothing_of_a_live_owner(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spared = subprocess.Popen(["sleep", "60"], start_new_session=True)
    dead_dir = Path(tempfile.mkdtemp(prefix=f"autotune-local-{gone.pid}-"))
    live_dir = Path(tempfile.mkdtemp(prefix=f"autotune-local-{os.getpid()}-"))
    state_dir().mkdir(parents=True, exist_ok=True)
    dead_ledger = state_dir() / f"local-{gone.pid}-test.json"
    live_ledger = state_dir() / f"local-{os.getpid()}-test.json"
    start = psutil.Process(leftover.pid).create_time()
    dead_ledger.write_text(json.dumps({"owner": gone.pid, "owner_start": None,
                                       "pids": [[leftover.pid, start]], "cgroups": [], "dirs": []}))
    live_ledger.write_text(json.dumps({
        "owner": os.getpid(), "owner_start": psutil.Process().create_time(),
        "pids": [[spared.pid, psutil.Process(spared.pid).create_time()]], "cgroups": [], "dirs": []}))
    try:
        removed = sweep()
        assert leftover.wait(5) == -signal.SIGKILL
        assert spared.poll() is None
        assert not dead_dir.exists() and live_dir.is_dir()
        assert not dead_ledger.exists() and live_ledger.exists()
        assert f"process {leftover.pid}" in removed
    finally:
        for p in (leftover, spared):
            p.kill()
            p.wait()
        live_ledger.unlink(missing_ok=True)
        live_dir.rmdir()


@pytest.fixture
def target() -> Iterator[LocalTarget]:
    with LocalTarget(SPEC, SERVICE) as t:  # starts, and closes whatever the test did
        yield t


def _traffic(url: str, stop: threading.Event) -> threading.Thread:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)

    def run() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=2)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
            except OSError:
                time.sleep(0.01)
            finally:
                conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _window_with_a_kill(target: LocalTarget, victim: Callable[[], int | None]) -> tuple[int, TrialFailed]:
    """Apply ``TUNED``, open a window under traffic, SIGKILL ``victim()``, close the window."""
    target.apply(TUNED)
    target.wait_ready(10)
    pid = victim()
    assert pid is not None
    stop = threading.Event()
    thread = _traffic(target.load_url, stop)
    try:
        target.begin_window()
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        with pytest.raises(TrialFailed) as info:
            target.end_window()
    finally:
        stop.set()
        thread.join()
    return pid, info.value


def _all_upstreams_serve(target: LocalTarget) -> None:
    for u in target._upstreams:
        assert u.alive and u.port is not None
        assert _target._get_status("127.0.0.1", u.port, 5) == 200
    assert _target._get_status("127.0.0.1", target._port(), 5) == 200


def _next_trial_works(target: LocalTarget) -> None:
    target.apply(TUNED)
    target.wait_ready(10)
    target.begin_window()
    assert _target._get_status("127.0.0.1", target._port(), 5) == 200
    usage = target.end_window()
    assert usage.window_s > 0
    assert target.observed().pool.max_connections == 7


@needs_envoy
@needs_cgroup
def test_an_upstream_killed_in_the_window_fails_the_trial_and_restore_starts_it_again(
        target: LocalTarget) -> None:
    victim, failure = _window_with_a_kill(target, lambda: target._upstreams[1].pid)
    assert failure.reason is FailReason.UPSTREAM_DIED and str(victim) in str(failure)
    target.restore()
    assert target._upstreams[1].pid != victim
    _all_upstreams_serve(target)
    assert target.observed().pool == Observed.expected(MeshConfig()).pool
    _next_trial_works(target)


@needs_envoy
@needs_cgroup
def test_envoy_killed_in_the_window_fails_the_trial_and_restore_starts_it_again(target: LocalTarget) -> None:
    victim, failure = _window_with_a_kill(target, lambda: target.envoy.pid if target.envoy else None)
    assert failure.reason is FailReason.PROXY_DIED and str(victim) in str(failure)
    target.restore()
    _all_upstreams_serve(target)
    _next_trial_works(target)


@needs_envoy
@needs_cgroup
def test_an_envoy_that_keeps_the_old_cluster_fails_the_trial_as_not_propagated(
        target: LocalTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _target.envoy_cluster
    # The fault: the restart is handed the baseline's cluster instead of the applied one.
    monkeypatch.setattr(_target, "envoy_cluster",
                        lambda _config, service, endpoints: real(MeshConfig(), service, endpoints))
    target.apply(TUNED)
    with pytest.raises(TrialFailed) as info:
        target.wait_ready(10)
    assert info.value.reason is FailReason.NOT_PROPAGATED
    assert "7 != None" in str(info.value)  # applied maxConnections 7, Envoy runs Istio's unset
    monkeypatch.undo()
    target.restore()
    _next_trial_works(target)

