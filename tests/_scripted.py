"""A finished study in a second: the real study loop (``run_study``: recording, constraints, drift
checks, confirmation, artifacts) on a no-op target, with ``measure_config`` replaced by a
deterministic model of a sidecar. Use ``install()`` in-process (pytest's monkeypatch) or run
``python tests/_scripted.py ARGS…`` for the ``autotune`` CLI with the model installed.

The model makes the dashboard's old mistake visible: configs with few connections answer fast
with 503s (error rate 14 %) and configs with a tiny CPU limit cannot carry the load (throughput
48 %); both look *better* on the objectives than every feasible config, so a front that ignores
the constraints would pick them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import Measurement, aggregate
from autotune.targets import ProxyUsage, Target


class NoopTarget(Target):
    """A target where applying and measuring take no time (the model does the measuring)."""

    name = "scripted"

    def start(self) -> None: ...
    def apply(self, config: MeshConfig) -> None: ...
    def wait_ready(self, timeout_s: float) -> None: ...
    def begin_window(self) -> None: ...
    def end_window(self) -> ProxyUsage:
        return ProxyUsage(cpu_cores=0.0, window_s=1.0)
    def restore(self) -> None: ...
    def close(self) -> None: ...

    @property
    def load_url(self) -> str:
        return "http://127.0.0.1:9"


def model_windows(config: MeshConfig, windows: int = 3, offered: float = 300.0) -> list[dict[str, float]]:
    """Per-window figures of ``config`` under the model (deterministic, small window-to-window spread)."""
    params = config.to_params()
    cpu = config.effective_cpu_limit
    conns = int(params.get("connectionPool.tcp.maxConnections", 1024))
    out = []
    for i in range(windows):
        jitter = 1.0 + 0.01 * (i - 1)
        if conns < 4:  # circuit breaker: fast 503s
            p95, error, ratio = 1.2, 0.14, 1.0
        elif cpu < 0.05:  # starved: cannot carry the load
            p95, error, ratio = 288.0, 0.0, 0.48
        else:
            p95, error, ratio = 5.0 + 0.4 / cpu + 8.0 / conns, 0.0, 1.0
        requests = offered * 8 * ratio
        out.append({
            "latency_p50_ms": round(0.6 * p95 * jitter, 3), "latency_p95_ms": round(p95 * jitter, 3),
            "latency_p99_ms": round(1.3 * p95 * jitter, 3), "achieved_rps": offered * ratio,
            "offered_rps": offered, "throughput_ratio": ratio, "error_rate": error,
            "requests": requests, "failures": round(requests * error), "window_s": 8.0,
            "cpu_cores": round(min(cpu, 0.3) * jitter, 4), "cpu_reserved_cores": cpu,
            "cpu_throttled_ratio": 0.0, "cpu_throttled_s": 0.0,
        })
    return out


def fake_measure(target: Target, spec: StudySpec, config: MeshConfig, observer: Any = None, *,
                 repeats: int | None = None, **_: Any) -> Measurement:
    """``measure_config`` under the model: same signature, no load run."""
    windows = model_windows(config, repeats or spec.measurement.repeats, spec.load.offered_rps)
    metrics, spread = aggregate(windows)
    metrics["windows"] = float(len(windows))
    counts = {"200": int(sum(w["requests"] - w["failures"] for w in windows))}
    failures = int(sum(w["failures"] for w in windows))
    if failures:
        counts["503"] = failures
    return Measurement(metrics=metrics, spread=spread, windows=windows, status_counts=counts,
                       observed={"concurrency": config.effective_concurrency},
                       timings={"total_s": 0.01})


def install(setattr_: Any) -> None:
    """Replace the measurement and the target factory (``setattr_`` is monkeypatch.setattr)."""
    import autotune.study._confirm as confirm
    import autotune.study._loop as loop

    setattr_(loop, "measure_config", fake_measure)
    setattr_(confirm, "measure_config", fake_measure)
    setattr_(loop, "make_target", lambda spec: NoopTarget())


def scripted_spec_data(tmp_path: Path, name: str = "scripted", trials: int = 14) -> dict[str, Any]:
    """A spec whose search reaches the infeasible corners (few connections, tiny CPU limits)."""
    return {
        "study": {"name": name, "storage": f"sqlite:///{tmp_path}/s.db", "trials": trials, "seed": 3,
                  "sampler": "random", "resultsDir": str(tmp_path / "out")},
        "service": {"name": "backend", "namespace": "staging", "port": 8080},
        "parameters": {
            "connectionPool.tcp.maxConnections": {"low": 1, "high": 1024, "log": True},
            "connectionPool.http.http1MaxPendingRequests": {"low": 1, "high": 1024, "log": True},
            "proxy.cpuLimit": {"low": "20m", "high": "2000m", "log": True},
        },
        "objectives": ["latency_p95_ms", "cpu_reserved_cores"],
        "load": {"users": 20, "ratePerUser": 15, "warmup": 1, "duration": 1},
        "measurement": {"repeats": 3, "maxRepeats": 3, "driftEvery": 5, "confirmRounds": 2,
                        "confirmMaxConfigs": 2},
        "target": {"kind": "local"},
    }


if __name__ == "__main__":  # python tests/_scripted.py <autotune args>
    install(lambda obj, name, value: setattr(obj, name, value))
    from autotune.cli import main

    sys.exit(main(sys.argv[1:], prog_name="autotune"))
