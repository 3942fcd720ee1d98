"""Shared fixtures. Every test must leave no process and no cgroup behind: checked after each one."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

#: Command-line fragments of every process autotune starts.
_OURS = ("envoy", "locust", "autotune.targets.local._upstream")

# A suite started with SIGINT ignored (a background job of a non-interactive shell: `cmd &`)
# would leave Python without its KeyboardInterrupt handler, here and in every child it starts,
# and the Ctrl-C tests would fail because of how the suite was started. Install Python's
# default handler: children get the default disposition back (a handler, unlike SIG_IGN, does
# not survive exec).
signal.signal(signal.SIGINT, signal.default_int_handler)


def _our_children() -> list[str]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if any(tag in cmd for tag in _OURS):
            out.append(f"{proc.pid}: {cmd[:120]}")
    return out


def _autotune_cgroups() -> list[str]:
    try:
        from autotune.targets.local._cgroup import list_autotune_cgroups
    except ImportError:  # pragma: no cover - the local target is part of the package
        return []
    # Only this test process's cgroups (named autotune-<pid>-…): another run may be going on.
    return [str(p) for p in list_autotune_cgroups() if f"autotune-{os.getpid()}-" in p.name]


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Fails the test if it leaves a child process or an autotune cgroup behind."""
    before = set(_autotune_cgroups())
    yield
    leftovers = _our_children()
    cgroups = sorted(set(_autotune_cgroups()) - before)
    assert not leftovers, f"processes left behind: {leftovers}"
    assert not cgroups, f"cgroups left behind: {cgroups}"


@pytest.fixture
def fast_storage(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The study storage of ``small_spec(tmp_path)`` specs in memory-backed /dev/shm when there is
    one: SQLite's syncs are most of a replayed trial's time. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fast_storage")``."""
    import _specs

    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="autotune-test-") as tmp:
        real = _specs.small_spec_data

        def data(path: Path, **overrides: Any) -> dict[str, Any]:
            out = real(path, **overrides)
            if "study.storage" not in overrides:
                out["study"]["storage"] = f"sqlite:///{tmp}/s.db"
            return out

        monkeypatch.setattr(_specs, "small_spec_data", data)
        yield


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fake Kubernetes API server with Prometheus (``fake_k8s.KubeEnv``), one per test module."""
    from fake_k8s import kube_env

    with kube_env(tmp_path_factory.mktemp("kube")) as env:
        yield env
