"""The target contract (autotune/targets/_base.py), run against every implementation.

The cases are ``autotune.testing.conformance.TargetConformance``; this module only plugs in a
factory per target: ``local`` (real Envoy, upstream processes, cgroups) and ``kubernetes`` (the
fake API server, its backend acting on the stored DestinationRule, a real Prometheus scraping
the fake kubelet).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from _specs import small_spec
from autotune.targets import Target, make_target
from autotune.targets.local._cgroup import detect, list_autotune_cgroups
from autotune.testing.conformance import TargetConformance, TargetFactory
from fake_k8s import KubeEnv, kube_env

_OURS = ("envoy", "autotune.targets.local._upstream")


class LocalFactory(TargetFactory):
    name = "local"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def _spec_target(self, **extra: object) -> dict[str, object]:
        return {"kind": "local", "upstream": {"endpoints": 2, "serviceTimeMs": 20}, **extra}

    def make(self) -> Target:
        return make_target(small_spec(self.tmp, target=self._spec_target()))

    def make_unstartable(self) -> Target:
        script = self.tmp / "envoy-that-exits"
        script.write_text("#!/bin/sh\necho '[x][1][critical][main] bad bootstrap' >&2\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        return make_target(small_spec(self.tmp, target=self._spec_target(envoyBinary=str(script))))

    def outside_state(self) -> object:
        procs = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if any(tag in cmd for tag in _OURS):
                procs.append(p.pid)
        tmp = sorted(str(p) for p in Path(tempfile.gettempdir()).glob("autotune-local-*")
                     if p.stat().st_uid == os.getuid())
        return sorted(procs), list_autotune_cgroups(os.getpid()), tmp


class KubernetesFactory(TargetFactory):
    name = "kubernetes"

    def __init__(self, env: KubeEnv, tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        env.seed()

    def make(self) -> Target:
        return make_target(small_spec(self.tmp, target=self.env.target_data()))

    def make_unstartable(self) -> Target:
        self.env.cluster.namespaces[KubeEnv.NAMESPACE] = {}  # not labelled for staging
        return self.make()

    def outside_state(self) -> object:
        c = self.env.cluster
        with c.lock:
            state = {"namespaces": c.namespaces,
                     "deployments": {"/".join(k): d["spec"] for k, d in c.deployments.items()},
                     # running pods, and the pods of deleted Deployments still terminating
                     "pods": sorted(p["metadata"]["name"] for ns in c.namespaces for p in c._pods(ns, consume=False)
                                    if "deletionTimestamp" not in p["metadata"]),
                     "deleted": sorted("/".join(k) for k in c.deleted),
                     "drs": {"/".join(k): d["spec"] for k, d in c.drs.items()},
                     "vss": {"/".join(k): d["spec"] for k, d in c.vss.items()},
                     "services": {"/".join(k): d["spec"] for k, d in c.services.items()}}
            return json.dumps(state, sort_keys=True)


_KUBE: dict[str, KubeEnv | str] = {}


@pytest.fixture(scope="module")
def kubernetes_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeEnv | str]:
    """A fake API server, its backend and a real Prometheus, shared by the kubernetes cases;
    the reason as a string when Prometheus is not installed."""
    try:
        with kube_env(tmp_path_factory.mktemp("kube")) as env:
            env.cluster.proxy_cpu_cores = 0.001  # an idle sidecar costs ~nothing ...
            env.cluster.proxy_cpu_per_request = 0.0005  # ... and traffic costs CPU
            yield env
    except pytest.skip.Exception as exc:
        yield str(exc)


@pytest.fixture(params=["local", "kubernetes"])
def target_factory(request: pytest.FixtureRequest, tmp_path: Path) -> TargetFactory:
    if request.param == "local":
        support = detect()
        if not support.available:
            pytest.skip(f"no writable CPU cgroup: {support.reason}")
        return LocalFactory(tmp_path)
    env = request.getfixturevalue("kubernetes_env")
    if isinstance(env, str):
        pytest.skip(env)
    return KubernetesFactory(env, tmp_path)


class TestTargetConformance(TargetConformance):
    """Every case of the suite, for each factory."""
