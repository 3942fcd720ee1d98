"""The resilience knobs on the real local target (real Envoy, real endpoint processes): outlier
detection ejects a failing endpoint, Istio's default route retry policy retries what it retries
(and not what it does not), and ``connectionPool.http.maxRetries`` caps concurrent retries.

Each test measures the behaviours side by side on one target, a few seconds of open-loop load
each (``tests/_openloop.py``). Run under ``flock /tmp/autotune-load.lock``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from _local import ENVOY_MISSING, SUPPORT
from _openloop import Run, run_open_loop
from autotune.mesh import MeshConfig
from autotune.spec import EndpointFault, LocalTargetSpec, ServiceRef, UpstreamSpec
from autotune.targets.local import LocalTarget

SERVICE = ServiceRef(name="backend", namespace="demo", port=8080)
#: 2 endpoints x 2 workers x 20 ms: the service's capacity is 200 requests/s, one endpoint's 100.
SERVICE_MS, WORKERS, ENDPOINTS = 20.0, 2, 2
CAPACITY_RPS = ENDPOINTS * WORKERS * 1000 / SERVICE_MS
SPEC = LocalTargetSpec(upstream=UpstreamSpec(endpoints=ENDPOINTS, service_time_ms=SERVICE_MS,
                                             workers=WORKERS))
#: Below what the one healthy endpoint can serve alone (100/s), so a shifted load still fits.
RPS = 0.3 * CAPACITY_RPS

pytestmark = pytest.mark.skipif(bool(ENVOY_MISSING) or not SUPPORT.available,
                                reason=ENVOY_MISSING or f"no writable CPU cgroup: {SUPPORT.reason}")


@pytest.fixture
def target() -> Iterator[LocalTarget]:
    with LocalTarget(SPEC, SERVICE) as t:
        assert isinstance(t, LocalTarget)
        yield t


def _apply(target: LocalTarget, config: MeshConfig) -> None:
    target.apply(config)
    target.wait_ready(20)


def _describe(name: str, run: Run) -> str:
    return f"{name}: {run.statuses}, {run.counters()}"


def test_outlier_detection_ejects_a_failing_endpoint_and_cuts_the_error_rate(
        target: LocalTarget) -> None:
    """One endpoint of two answers 503 to half its requests. Without outlier detection a quarter
    or more of the client's requests fail all along; with it, Envoy ejects the endpoint at its
    second 503 in a row and the rest go to the healthy one (more than 10 errors before that
    needs 10 lone 503s in a row: about 1 in 1000)."""
    target.set_endpoint_faults([EndpointFault(endpoints=1, error_rate=0.5)])
    _apply(target, MeshConfig())
    plain = run_open_loop(target, RPS)
    _apply(target, MeshConfig(consecutive_5xx_errors=2, outlier_interval_ms=1000,
                              base_ejection_time_ms=30_000, max_ejection_percent=50))
    ejecting = run_open_loop(target, RPS)
    print(f"\n{_describe('no outlier detection', plain)}\n{_describe('outlier detection', ejecting)}")
    assert plain.usage.extra["envoy_ejections"] == 0
    assert plain.errors > 0.1 * plain.sent, plain.statuses  # a 503 response is not retried
    assert ejecting.usage.extra["envoy_ejections"] >= 1
    # Ejected for the rest of the run (30 s) after a few 503s, or already by wait_ready's probes.
    assert ejecting.errors <= 10, ejecting.statuses
    assert ejecting.errors < plain.errors / 5, (ejecting.statuses, plain.statuses)
    assert ejecting.usage.extra["envoy_upstream_503"] == ejecting.statuses.get(503, 0)


def test_the_default_retry_policy_retries_refused_connections_on_another_endpoint(
        target: LocalTarget) -> None:
    """A replica that refuses connections (its process died, it is still an endpoint): each
    attempt on it is a connect failure that Istio's default policy retries, on the other endpoint
    as a rule (previous-hosts predicate), so the client sees next to no error. With the policy
    removed (``retries.attempts: 0``) every such attempt reaches the client.

    The predicate does not guarantee another endpoint: it re-picks at most 5 times
    (``host_selection_retry_max_attempts``), and least-request balancing prefers the refusing
    endpoint (it has no active request), so some retries land on it again; a request fails
    only when its 2 retries both do (about 1 in 100–200 here)."""
    target.set_endpoint_faults([EndpointFault(endpoints=1, refuse_connections=True)])
    served = target.endpoint_stats()[0]["served"]  # the start's readiness probe
    default = run_open_loop(target, RPS, seconds=2.0)
    _apply(target, MeshConfig(retry_attempts=0))
    no_retries = run_open_loop(target, RPS, seconds=2.0)
    print(f"\n{_describe('default retry policy', default)}\n{_describe('no retries', no_retries)}")
    extra = default.usage.extra
    refused = extra["envoy_connect_failures"]  # the failing endpoint's faults, as Envoy saw them
    assert refused > 0.3 * default.sent
    assert target.endpoint_stats()[0]["served"] == served  # nothing reached it
    assert extra["envoy_retry_overflow"] == 0
    # Every refused attempt is retried until a request has had its 2 retries: the client's
    # errors are exactly the attempts that were not retried.
    assert default.errors == refused - extra["envoy_retries"]
    assert default.errors <= 0.03 * default.sent, default.statuses
    # Each request that succeeded after retries was refused once or twice (its first retry
    # landed on the refusing endpoint again), each failed one three times.
    success = extra["envoy_retry_success"]
    assert success <= refused - 3 * default.errors <= 2 * success
    assert no_retries.usage.extra["envoy_retries"] == 0
    refused = no_retries.usage.extra["envoy_connect_failures"]
    assert no_retries.errors == no_retries.statuses.get(503, 0) == refused > 0.3 * no_retries.sent


def test_the_default_retry_policy_does_not_retry_a_reset_or_a_503(target: LocalTarget) -> None:
    """Istio 1.30's default ``retry_on`` (connect-failure, refused-stream, unavailable, cancelled,
    retriable-status-codes with no codes) retries neither a connection reset after the request
    was sent (that needs ``reset``) nor a 503 response (that needs a retriable status code):
    both reach the client, once per fault."""
    target.set_endpoint_faults([EndpointFault(endpoints=1, reset_rate=1.0)])
    reset = run_open_loop(target, RPS, seconds=2.0)
    resets = target.endpoint_stats()[0]["fault_reset"]
    target.set_endpoint_faults([EndpointFault(endpoints=1, error_rate=1.0)])
    failing = run_open_loop(target, RPS, seconds=2.0)
    answered_503 = target.endpoint_stats()[0]["fault_503"]
    print(f"\n{_describe('reset', reset)}\n{_describe('503', failing)}")
    assert reset.usage.extra["envoy_retries"] == failing.usage.extra["envoy_retries"] == 0
    assert resets > 0.1 * reset.sent
    assert reset.usage.extra["envoy_upstream_resets"] == resets
    assert reset.errors == resets  # wait_ready's probe went to the other endpoint or got a 503
    assert answered_503 > 0.1 * failing.sent
    assert failing.statuses.get(503, 0) == failing.errors == failing.usage.extra["envoy_upstream_503"]
    assert failing.errors == pytest.approx(answered_503, abs=2)  # + wait_ready's probes before


def test_max_retries_caps_concurrent_retries(target: LocalTarget) -> None:
    """With a replica refusing connections, every request sent to it needs a retry. Istio's
    default ``maxRetries`` (unset: 4294967295) lets them all through; ``maxRetries: 1`` allows
    one outstanding retry at a time, and each retry beyond it fails the request
    (``upstream_rq_retry_overflow``)."""
    target.set_endpoint_faults([EndpointFault(endpoints=1, refuse_connections=True)])
    default = run_open_loop(target, RPS)
    _apply(target, MeshConfig(max_retries=1))
    capped = run_open_loop(target, RPS)
    print(f"\n{_describe('maxRetries unset', default)}\n{_describe('maxRetries 1', capped)}")
    assert default.usage.extra["envoy_retry_overflow"] == 0
    assert default.errors <= 0.03 * default.sent, default.statuses  # see the test above
    extra = capped.usage.extra
    assert extra["envoy_retry_overflow"] > 0.1 * capped.sent
    assert capped.errors > default.errors + 0.1 * capped.sent
    # A request fails when its last refused attempt was not retried (overflow, or out of retries).
    assert capped.errors == extra["envoy_connect_failures"] - extra["envoy_retries"]
    assert capped.errors >= extra["envoy_retry_overflow"]
