"""The target contract (autotune/targets/_base.py), run against every implementation.

Each case uses only the ``Target`` interface, so a new target (Kubernetes) joins by adding a
factory to ``TARGETS``.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _specs import small_spec
from autotune.errors import TrialFailed
from autotune.mesh import MeshConfig
from autotune.targets import Target, make_target
from fake_k8s import KubeEnv, kube_env

TargetFactory = Callable[[Path], Target]


def _local(tmp_path: Path) -> Target:
    return make_target(small_spec(tmp_path))


_KUBE: dict[str, KubeEnv | str] = {}


@pytest.fixture(scope="module", autouse=True)
def _kubernetes_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A fake API server, the service's stand-in and a real Prometheus scraping the fake kubelet,
    shared by the kubernetes cases (reset by each factory call)."""
    try:
        with kube_env(tmp_path_factory.mktemp("kube")) as env:
            _KUBE["env"] = env
            yield
    except pytest.skip.Exception as exc:  # no prometheus binary: only the kubernetes cases skip
        _KUBE["skip"] = str(exc)
        yield
    finally:
        _KUBE.clear()


def _kubernetes(tmp_path: Path) -> Target:
    env = _KUBE.get("env")
    if not isinstance(env, KubeEnv):
        pytest.skip(str(_KUBE.get("skip", "no kubernetes test environment")))
    env.seed()
    return make_target(small_spec(tmp_path, target=env.target_data()))


TARGETS: dict[str, TargetFactory] = {"local": _local, "kubernetes": _kubernetes}


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    tgt = TARGETS[request.param](tmp_path)
    tgt.start()
    try:
        yield tgt
    finally:
        tgt.close()


def _get(url: str) -> int:
    assert url.startswith("http://127.0.0.1:")  # tests only ever load 127.0.0.1
    with urllib.request.urlopen(url + "/", timeout=5) as r:
        return int(r.status)


def test_applied_config_serves_traffic_and_is_observable(target: Target) -> None:
    target.apply(MeshConfig(max_connections=16, concurrency=1, cpu_limit=0.5))
    target.wait_ready(30)
    assert _get(target.load_url) == 200
    observed = target.observed_config()
    if "concurrency" in observed:
        assert observed["concurrency"] == 1


def test_window_measures_cpu_over_exactly_its_span(target: Target) -> None:
    target.apply(MeshConfig())
    target.wait_ready(30)
    target.begin_window()
    t0 = time.monotonic()
    for _ in range(50):
        _get(target.load_url)
    time.sleep(0.5)
    usage = target.end_window()
    elapsed = time.monotonic() - t0
    assert usage.window_s == pytest.approx(elapsed, abs=0.1)
    assert 0 < usage.cpu_cores < 2.5
    assert 0 <= usage.throttled_ratio <= 1


def test_rejected_config_fails_the_trial_and_restore_brings_the_baseline_back(target: Target) -> None:
    with pytest.raises(TrialFailed):
        target.apply(MeshConfig(max_connections=-1))  # Istio and Envoy both reject it
        target.wait_ready(10)
    target.restore()
    target.restore()  # idempotent
    assert _get(target.load_url) == 200


def test_restore_and_close_are_safe_anytime(tmp_path: Path) -> None:
    for factory in TARGETS.values():
        tgt = factory(tmp_path)
        tgt.restore()  # before start: nothing to do
        tgt.close()
        tgt.close()
        with factory(tmp_path) as started:
            started.apply(MeshConfig(concurrency=1))
            started.wait_ready(30)
        started.close()  # after the context manager closed it
