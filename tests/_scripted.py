"""A finished study in seconds: the real ``autotune study start`` (loop, measurement, recording,
constraints, drift checks, confirmation, artifacts, exports) on the replay target and driver
(autotune/testing/replay.py) over a deterministic model of a sidecar. ``install(setattr)`` does it
in-process (pass pytest's ``monkeypatch.setattr``); ``python tests/_scripted.py ARGS…`` runs the
``autotune`` CLI with it installed (for tests that need a real pipe).

The model makes the dashboard's old mistake visible: configs with few connections answer fast
with 503s (error rate 14 %) and configs with a tiny CPU limit cannot carry the load (throughput
48 %); both look *better* on the objectives than every feasible config, so a front that ignores
the constraints would pick them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna

from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import Observer, run_study
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget


def model(config: MeshConfig) -> Point:
    """What ``config`` measures: p95 falls with the CPU limit and the connection limit."""
    cpu = config.effective_cpu_limit
    conns = int(config.to_params().get("connectionPool.tcp.maxConnections", 1024))
    if conns < 4:  # circuit breaker: fast 503s
        return Point(0.7, 1.2, 1.6, cpu_cores=min(cpu, 0.3), error_rate=0.14, noise_cv=0.01)
    if cpu < 0.05:  # starved: cannot carry the load
        return Point(150.0, 288.0, 350.0, cpu_cores=cpu, throughput_ratio=0.48, noise_cv=0.01)
    p95 = 5.0 + 0.4 / cpu + 8.0 / conns
    return Point(0.6 * p95, p95, 1.3 * p95, cpu_cores=min(cpu, 0.3), noise_cv=0.01)


def install(setattr_: Any) -> None:
    """Make ``autotune study start`` run on the replayed model (``setattr_``: monkeypatch.setattr)."""
    import autotune.study as study_api  # the CLI imports run_study from there when a spec has passed

    land = Landscape.synthetic(model, seed=3)

    def replayed(spec: StudySpec, observer: Observer | None = None) -> optuna.Study:
        return run_study(spec, observer, ReplayTarget(land), load=ReplayDriver(land))

    setattr_(study_api, "run_study", replayed)


def scripted_spec_data(tmp_path: Path, name: str = "scripted", trials: int = 14) -> dict[str, Any]:
    """A spec whose search reaches the infeasible corners (few connections, tiny CPU limits)."""
    return {
        "study": {"name": name, "storage": f"sqlite:///{tmp_path}/s.db", "trials": trials, "seed": 3,
                  "sampler": "random", "resultsDir": str(tmp_path / "out")},
        "service": {"name": "backend", "namespace": "staging", "port": 8080},
        "sidecar": {"cpuRequest": "20m"},  # <= the lowest CPU limit searched
        "parameters": {
            "connectionPool.tcp.maxConnections": {"low": 1, "high": 1024, "log": True},
            "connectionPool.http.http1MaxPendingRequests": {"low": 1, "high": 1024, "log": True},
            "proxy.cpuLimit": {"low": "20m", "high": "2000m", "log": True},
        },
        "objectives": ["latency_p95_ms", "cpu_reserved_cores"],
        "load": {"users": 20, "ratePerUser": 15},
        "timing": {"warmup": 1, "window": 1},
        "measurement": {"repeats": 3, "maxRepeats": 3, "driftEvery": 5, "confirmRounds": 2,
                        "confirmMaxConfigs": 2},
        "target": {"kind": "local"},
    }


if __name__ == "__main__":  # python tests/_scripted.py <autotune args>
    install(lambda obj, name, value: setattr(obj, name, value))
    from autotune.cli import main

    sys.exit(main(sys.argv[1:], prog_name="autotune"))
