"""The local service model: finite-capacity endpoints, service-time distributions, endpoint faults,
and Envoy's counters per window — on the real local target (real Envoy, real endpoint processes).

The load is an open-loop client (``tests/_openloop.py``), so a queue above capacity shows as it
grows. Tests that start processes need the Envoy binary and a
CPU cgroup; run them under ``flock /tmp/autotune-load.lock``.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from _local import ENVOY_MISSING, SUPPORT
from _openloop import run_open_loop
from autotune.errors import SpecError, TargetError
from autotune.mesh import MeshConfig
from autotune.spec import EndpointFault, LocalTargetSpec, ServiceRef, UpstreamSpec, parse_spec
from autotune.targets import ProxyUsage
from autotune.targets.kubernetes._faults import fault_env
from autotune.targets.local import LocalTarget
from autotune.targets.local._counters import ENVOY_COUNTERS
from autotune.targets.local._target import endpoint_faults
from autotune.targets.local._upstream import Faults, ServiceTimeSampler

SERVICE = ServiceRef(name="backend", namespace="demo", port=8080)
#: 2 endpoints x 2 workers x 20 ms: the service's capacity is 200 requests/s.
SERVICE_MS, WORKERS, ENDPOINTS = 20.0, 2, 2
CAPACITY_RPS = ENDPOINTS * WORKERS * 1000 / SERVICE_MS
SPEC = LocalTargetSpec(upstream=UpstreamSpec(endpoints=ENDPOINTS, service_time_ms=SERVICE_MS,
                                             workers=WORKERS))


# -- pure: the sampler, the spec, the fault layout ------------------------------------------------

@pytest.mark.parametrize("distribution", ["fixed", "exponential", "lognormal"])
def test_service_time_distributions_have_the_configured_mean(distribution: str) -> None:
    sampler = ServiceTimeSampler(distribution, mean_ms=5.0, sigma=0.5, seed=7)
    draws = [sampler.sample() * 1000 for _ in range(40_000)]
    assert statistics.fmean(draws) == pytest.approx(5.0, rel=0.03)
    assert min(draws) >= 0
    if distribution == "fixed":
        assert set(draws) == {5.0}
    elif distribution == "exponential":
        assert statistics.stdev(draws) == pytest.approx(5.0, rel=0.05)  # sd = mean
    else:
        assert statistics.stdev([math.log(d) for d in draws]) == pytest.approx(0.5, rel=0.05)
    again = ServiceTimeSampler(distribution, mean_ms=5.0, sigma=0.5, seed=7)
    assert [again.sample() * 1000 for _ in range(5)] == draws[:5]  # seeded: reproducible


def test_spec_service_model_fields() -> None:
    up = UpstreamSpec.model_validate({"serviceTimeMs": 3})
    assert (up.service_time.distribution, up.service_time_ms, up.workers, up.queue_limit) == (
        "fixed", 3.0, 8, None)
    up = UpstreamSpec.model_validate({
        "endpoints": 3, "workers": 4, "queueLimit": 10,
        "serviceTime": {"distribution": "lognormal", "meanMs": 5, "sigma": 0.8},
        "faults": [{"endpoints": 1, "errorRate": 0.5}, {"endpoints": 1, "delayMs": 50}]})
    assert up.service_time.sigma == 0.8 and up.queue_limit == 10
    assert [f.error_rate for f in up.faults] == [0.5, 0.0] and up.faults[1].delay_ms == 50
    assert UpstreamSpec.model_validate(up.model_dump(by_alias=True)) == up  # round-trips


@pytest.mark.parametrize(("upstream", "message"), [
    ({"serviceTimeMs": 3, "serviceTime": {"meanMs": 3}}, "either serviceTimeMs or serviceTime"),
    ({"endpoints": 2, "faults": [{"endpoints": 2}, {"endpoints": 1}]}, "name 3 endpoints"),
    ({"faults": [{"errorRate": 0.6, "resetRate": 0.6}]}, "errorRate + resetRate must be at most 1"),
    ({"serviceTime": {"distribution": "pareto"}}, "target.upstream.serviceTime.distribution"),
    ({"workers": 0}, "target.upstream.workers"),
])
def test_spec_refuses_bad_service_models(upstream: dict[str, object], message: str) -> None:
    raw = {"study": {"name": "s"}, "target": {"kind": "local", "upstream": upstream},
           "search": {"proxy.concurrency": {"low": 1, "high": 2}}}
    with pytest.raises(SpecError, match=message.replace("+", r"\+")):
        parse_spec(raw)


def test_faults_apply_to_disjoint_endpoints_in_order() -> None:
    slow, failing = EndpointFault(endpoints=1, delay_ms=30), EndpointFault(endpoints=2, error_rate=0.5)
    assert endpoint_faults([slow, failing], 4) == [
        Faults(delay_ms=30), Faults(error_rate=0.5), Faults(error_rate=0.5), Faults()]
    assert endpoint_faults([], 2) == [Faults(), Faults()]
    with pytest.raises(TargetError, match="name 3 endpoints but the service has 2"):
        endpoint_faults([failing, slow], 2)


def test_refused_connections_are_a_fault_of_their_own() -> None:
    fault = EndpointFault.model_validate({"endpoints": 1, "refuseConnections": True})
    assert fault.refuse_connections and fault.model_dump(by_alias=True)["refuseConnections"] is True
    assert endpoint_faults([fault], 2) == [Faults(refuse_connections=True), Faults()]
    faults = Faults(error_rate=0.5, refuse_connections=True)
    assert Faults.from_json(faults.to_json()) == faults
    with pytest.raises(TypeError, match="refuse_connections must be true or false"):
        Faults.from_dict({"refuse_connections": 1})
    with pytest.raises(TypeError, match="error_rate must be a number"):
        Faults.from_dict({"error_rate": True})


def test_envoy_counters_reach_the_trial_record_and_trials_csv() -> None:
    import optuna

    from autotune.export import trials_frame
    from autotune.load import LoadResult
    from autotune.study._measure import combine
    from autotune.study._record import TrialRecord
    from autotune.study._stats import aggregate

    load = LoadResult(offered_rps=100, achieved_rps=100, requests=100, failures=0, window_s=1.0,
                      latency_p50_ms=5, latency_p95_ms=6, latency_p99_ms=7)
    counters = dict.fromkeys(ENVOY_COUNTERS.values(), 0.0)
    windows = [combine(load, ProxyUsage(cpu_cores=0.1, window_s=1.0,
                                  extra={**counters, "envoy_pending_overflow": n}), MeshConfig())
               for n in (3.0, 5.0, 4.0)]
    metrics, _ = aggregate(windows)
    assert metrics["envoy_pending_overflow"] == 12.0  # the trial's total: counters are summed over windows
    study = optuna.create_study(directions=["minimize"])
    study.add_trial(optuna.trial.create_trial(
        value=1.0, user_attrs=TrialRecord(metrics=metrics, windows=windows).user_attrs()))
    assert TrialRecord.read(study.trials[0]).metrics["envoy_pending_overflow"] == 12.0
    row = trials_frame(study).iloc[0]
    assert row["envoy_pending_overflow"] == 12.0 and row["envoy_retries"] == 0.0


# -- the real local target -----------------------------------------------------------------------

real = pytest.mark.skipif(bool(ENVOY_MISSING) or not SUPPORT.available,
                          reason=ENVOY_MISSING or f"no writable CPU cgroup: {SUPPORT.reason}")


@pytest.fixture
def target() -> Iterator[LocalTarget]:
    """A started target per test (conftest checks that no process outlives a test)."""
    with LocalTarget(SPEC, SERVICE) as t:  # starts, and closes whatever the test did
        yield t


@real
def test_above_capacity_the_queue_grows_without_burning_cpu(target: LocalTarget) -> None:
    below = run_open_loop(target, 0.5 * CAPACITY_RPS)
    above = run_open_loop(target, 1.5 * CAPACITY_RPS)
    print(f"\np95 at 50% of capacity: {below.p95():.1f} ms, at 150%: {above.p95():.1f} ms; "
          f"upstream CPU at 150%: {above.upstream_cpu_s / above.usage.window_s:.3f} cores, "
          f"{1e3 * above.upstream_cpu_s / above.sent:.3f} ms per request; "
          f"envoy {above.usage.cpu_cores:.3f} cores")
    assert below.statuses == {200: below.sent}
    assert below.p95() < 3 * SERVICE_MS, below.p95()
    # Above capacity with Istio's unbounded pools, every request is served but waits in the
    # endpoints' queues: a third of the offered load piles up over the run.
    assert above.statuses == {200: above.sent}
    assert above.p95() > 10 * below.p95(), (above.p95(), below.p95())
    assert above.usage.extra["envoy_pending_overflow"] == 0
    assert above.usage.extra["envoy_upstream_rq"] == pytest.approx(above.sent, abs=5)
    assert max(s["max_queue"] for s in target.endpoint_stats()) > 20
    # The service time is slept: the endpoints' CPU per request is a small part of it.
    assert above.upstream_cpu_s / above.sent < 0.1 * SERVICE_MS / 1000


@real
def test_tight_pools_shed_load_and_keep_latency_bounded(target: LocalTarget) -> None:
    target.apply(MeshConfig(max_connections=ENDPOINTS * WORKERS, http1_max_pending_requests=4))
    target.wait_ready(20)
    run = run_open_loop(target, 1.5 * CAPACITY_RPS)
    extra = run.usage.extra
    print(f"\ntight pools at 150%: {run.statuses}, p95 of 200s {run.p95():.1f} ms, counters "
          f"{ {k: v for k, v in extra.items() if v} }")
    assert run.statuses.get(503, 0) > 0.1 * run.sent, run.statuses
    assert extra["envoy_pending_overflow"] == pytest.approx(run.statuses[503], abs=5)
    assert extra["envoy_pending"] > 0
    # at most max_connections in service and 4 waiting: a few service times, not a growing queue
    assert run.p95() < 10 * SERVICE_MS, run.p95()  # unbounded pools: over 1 s here


@real
def test_failing_endpoint_shows_in_the_counters_and_heals_live(target: LocalTarget) -> None:
    target.set_endpoint_faults([EndpointFault(endpoints=1, error_rate=0.5)])
    failing = run_open_loop(target, 0.4 * CAPACITY_RPS, seconds=2.0)
    stats = target.endpoint_stats()
    target.set_endpoint_faults([])
    healed = run_open_loop(target, 0.4 * CAPACITY_RPS, seconds=2.0)
    print(f"\none endpoint failing half its requests: {failing.statuses}, "
          f"envoy_upstream_503={failing.usage.extra['envoy_upstream_503']}; healed: {healed.statuses}")
    # Least-request balancing over two endpoints sends it about half: a quarter fail.
    assert 0.1 * failing.sent < failing.statuses.get(503, 0) < 0.45 * failing.sent, failing.statuses
    assert failing.usage.extra["envoy_upstream_503"] == failing.statuses[503]
    assert failing.usage.extra["envoy_upstream_5xx"] == failing.statuses[503]
    assert stats[0]["fault_503"] == failing.statuses[503] and stats[1]["fault_503"] == 0
    assert healed.statuses == {200: healed.sent}
    assert healed.usage.extra["envoy_upstream_503"] == 0


@real
def test_slow_endpoint_and_restore_puts_the_spec_faults_back(target: LocalTarget) -> None:
    target.set_endpoint_faults([EndpointFault(endpoints=1, delay_ms=200)])
    slow = run_open_loop(target, 0.2 * CAPACITY_RPS, seconds=2.0)
    assert slow.statuses == {200: slow.sent}
    assert max(slow.latencies_ms) > 200 > min(slow.latencies_ms)  # one endpoint of two is slow
    target.restore()
    assert target.endpoint_faults == SPEC.upstream.faults == ()
    fast = run_open_loop(target, 0.2 * CAPACITY_RPS, seconds=1.0)
    assert max(fast.latencies_ms) < 150, max(fast.latencies_ms)


@real
def test_reset_connections_show_as_upstream_resets(target: LocalTarget) -> None:
    target.set_endpoint_faults([EndpointFault(endpoints=1, reset_rate=1.0)])
    run = run_open_loop(target, 0.2 * CAPACITY_RPS, seconds=2.0)
    extra = run.usage.extra
    print(f"\none endpoint resetting every connection: {run.statuses}, counters "
          f"{ {k: v for k, v in extra.items() if v} }")
    resets = target.endpoint_stats()[0]["fault_reset"]
    assert resets > 0
    assert extra["envoy_upstream_resets"] == resets


@real
def test_every_counter_is_reported_per_window(target: LocalTarget) -> None:
    target.begin_window()
    usage = target.end_window()
    assert set(usage.extra) == set(ENVOY_COUNTERS.values())
    assert all(v == 0 for v in usage.extra.values()), usage.extra


@real
def test_default_faults_are_in_force_from_the_start() -> None:
    spec = SPEC.model_copy(update={"upstream": SPEC.upstream.model_copy(
        update={"faults": (EndpointFault(endpoints=1, error_rate=1.0),)})})
    with LocalTarget(spec, SERVICE) as t:  # ready although one endpoint always fails
        assert isinstance(t, LocalTarget)
        run = run_open_loop(t, 0.2 * CAPACITY_RPS, seconds=1.0)
        assert 0 < run.statuses.get(503, 0) < run.sent
        t.set_endpoint_faults([])
        t.restore()
        assert t.endpoint_faults == spec.upstream.faults
        assert t.endpoint_stats()[0]["fault_503"] >= run.statuses[503]  # + wait_ready's probes


def test_an_endpoint_started_with_the_fault_variables_misbehaves_as_a_replica_is_told(tmp_path: Path) -> None:
    """The contract the Kubernetes target writes on a misbehaving replica (and the staging demo's
    backend, this endpoint, reads): AUTOTUNE_FAULT_ERROR_RATE=1 answers every request 503."""
    env = {**os.environ, **{e["name"]: e["value"] for e in fault_env(EndpointFault(endpoints=1, error_rate=1.0))}}
    with subprocess.Popen([sys.executable, "-m", "autotune.targets.local._upstream", "--port", "0"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().split()[1])
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with pytest.raises(urllib.error.HTTPError) as err:
                opener.open(f"http://127.0.0.1:{port}/", timeout=5)
            err.value.close()
            assert err.value.code == 503
        finally:
            proc.terminate()
            proc.wait(10)


def test_the_fault_variables_cover_every_fault_field() -> None:
    """Every field of an endpoint fault reaches a replica through its environment and back."""
    fault = EndpointFault(endpoints=1, delay_ms=30, service_time_factor=2.5, error_rate=0.25, refuse_connections=True)
    env = {e["name"]: e["value"] for e in fault_env(fault)}
    assert Faults.from_env(env) == Faults(delay_ms=30, service_time_factor=2.5, error_rate=0.25,
                                          refuse_connections=True)
    assert Faults.from_env({}) == Faults()
