"""The target conformance suite: the guarantees of ``autotune.targets.Target``, as pytest cases.

Like optuna's ``optuna/testing/pytest_storages.py``, the cases live in the package so that every
target runs the same ones. A test module plugs targets in with a ``target_factory`` fixture and a
subclass whose name starts with ``Test``::

    from autotune.testing.conformance import TargetConformance, TargetFactory

    @pytest.fixture(params=["local", "kubernetes"])
    def target_factory(request) -> TargetFactory: ...

    class TestTargets(TargetConformance):
        pass

Each case uses only the ``Target`` interface and the factory, and each can fail: the applied
config is read back with ``Target.observed()`` and compared field by field, traffic goes through
``load_url`` (which must be on 127.0.0.1 in tests), and what a target leaves behind is compared
with ``TargetFactory.outside_state()``.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.mesh import MeshConfig
from autotune.spec import EndpointFault
from autotune.targets import Observed, Target

#: Every tuned field set, none at its default.
CONFIG_A = MeshConfig(max_connections=7, http1_max_pending_requests=3, http2_max_requests=11,
                      max_requests_per_connection=5, max_retries=2, concurrency=1, cpu_limit=0.5)
#: One field A sets; everything A sets and B leaves out must be back at Istio's default.
CONFIG_B = MeshConfig(http2_max_requests=100)
#: Circuit breakers that let one request through and queue one: a burst must see 503s.
TIGHT_BREAKERS = MeshConfig(max_connections=1, http1_max_pending_requests=1, http2_max_requests=1)
#: Istio's webhook and Envoy both refuse a negative limit.
REJECTED = MeshConfig(max_connections=-1)
READY_TIMEOUT_S = 60.0


class TargetFactory(ABC):
    """Makes targets of one kind for the suite (one factory per test)."""

    name: str = "target"

    @abstractmethod
    def make(self) -> Target:
        """A new, not started target whose baseline is Istio's defaults (``MeshConfig()``)."""

    @abstractmethod
    def make_unstartable(self) -> Target:
        """A new target whose ``start`` must fail with ``TargetError`` after it has begun to
        set things up (e.g. an Envoy binary that exits; a namespace not labelled for staging)."""

    @abstractmethod
    def outside_state(self) -> object:
        """Everything a target could change or leave outside itself (processes, cgroups,
        temporary files; cluster objects), comparable with ``==``."""


def get(url: str, timeout_s: float = 10.0) -> int:
    """Status of one ``GET`` on a fresh connection to a loopback ``url``."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", f"tests only send traffic to 127.0.0.1, not {url}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        conn.request("GET", parts.path or "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def burst(url: str, clients: int) -> Counter[int]:
    """``clients`` requests released at the same instant; the count of each status."""
    gate = threading.Barrier(clients)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def one() -> None:
        gate.wait()
        status = get(url)
        with lock:
            statuses[status] += 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def drive(url: str, seconds: float, clients: int = 8) -> int:
    """Keep-alive ``GET /`` from ``clients`` threads for ``seconds``; the number of 200s."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", f"tests only send traffic to 127.0.0.1, not {url}"
    ok = [0] * clients
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
        try:
            while time.monotonic() < deadline:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                ok[i] += resp.status == 200
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def apply_and_wait(target: Target, config: MeshConfig) -> Observed:
    """Apply ``config``, wait until it serves, and return what the target observes."""
    target.apply(config)
    target.wait_ready(READY_TIMEOUT_S)
    return target.observed()


@contextlib.contextmanager
def closing(target: Target) -> Iterator[Target]:
    """``target``, closed on the way out even when a case fails (so a broken target cannot
    leave processes to the next case); a failing ``close`` is the case's own business."""
    try:
        yield target
    finally:
        with contextlib.suppress(Exception):
            target.close()


def assert_observed(observed: Observed, expected: Observed) -> None:
    """Fail naming every tuned field that differs."""
    diff = observed.differences(expected)
    assert not diff, "observed != expected: " + "; ".join(diff) + f" (details: {observed.details})"


class TargetConformance:
    """The cases. Subclass as ``Test…`` in a module that defines a ``target_factory`` fixture."""

    @pytest.fixture
    def target(self, target_factory: TargetFactory) -> Iterator[Target]:
        """A started target, closed after the case."""
        tgt = target_factory.make()
        tgt.start()
        try:
            yield tgt
        finally:
            tgt.close()

    # -- apply and observe ---------------------------------------------------------------------

    def test_apply_puts_every_tuned_field_in_force(self, target: Target) -> None:
        assert_observed(apply_and_wait(target, CONFIG_A), Observed.expected(CONFIG_A))
        assert get(target.load_url) == 200

    def test_a_second_apply_leaves_no_trace_of_the_first(self, target: Target) -> None:
        apply_and_wait(target, CONFIG_A)
        assert_observed(apply_and_wait(target, CONFIG_B), Observed.expected(CONFIG_B))

    def test_the_baseline_after_start_is_istio_defaults(self, target: Target) -> None:
        assert_observed(target.observed(), Observed.expected(MeshConfig()))

    def test_circuit_breakers_act_on_traffic(self, target: Target) -> None:
        apply_and_wait(target, TIGHT_BREAKERS)
        tight = burst(target.load_url, 16)
        assert tight[503] >= 1 and tight[200] >= 1, f"one in flight, one queued, 16 at once: {dict(tight)}"
        apply_and_wait(target, MeshConfig())
        free = burst(target.load_url, 16)
        assert free == Counter({200: 16}), f"no limits, 16 at once: {dict(free)}"

    # -- restore and close ---------------------------------------------------------------------

    def test_restore_brings_the_baseline_back(self, target: Target) -> None:
        baseline = target.observed()
        apply_and_wait(target, CONFIG_A)
        target.restore()
        assert_observed(target.observed(), baseline)
        assert get(target.load_url) == 200

    def test_restore_is_idempotent(self, target: Target) -> None:
        baseline = target.observed()
        target.restore()  # the baseline is in force: nothing to do
        apply_and_wait(target, CONFIG_B)
        target.restore()
        target.restore()
        assert_observed(target.observed(), baseline)

    def test_restore_and_close_before_start_are_no_ops(self, target_factory: TargetFactory) -> None:
        before = target_factory.outside_state()
        with closing(target_factory.make()) as tgt:
            tgt.restore()
            tgt.close()
            tgt.close()
            tgt.restore()
            assert target_factory.outside_state() == before
            with pytest.raises(TargetError):
                tgt.start()  # a closed target stays closed

    def test_close_restores_releases_everything_and_is_idempotent(self, target_factory: TargetFactory) -> None:
        before = target_factory.outside_state()
        with closing(target_factory.make()) as tgt:
            tgt.start()
            apply_and_wait(tgt, CONFIG_A)
            tgt.close()
            tgt.close()
            tgt.restore()  # after close: a no-op
            assert target_factory.outside_state() == before
            with pytest.raises(TargetError):
                tgt.apply(CONFIG_B)

    def test_a_rejected_config_fails_the_trial_and_the_target_recovers(self, target: Target) -> None:
        baseline = target.observed()
        with pytest.raises(TrialFailed) as failed:
            target.apply(REJECTED)
            target.wait_ready(10)
        assert failed.value.reason in (FailReason.REJECTED, FailReason.PROXY_START)
        target.restore()
        assert_observed(target.observed(), baseline)
        assert get(target.load_url) == 200

    def test_close_after_a_failed_apply_releases_everything(self, target_factory: TargetFactory) -> None:
        before = target_factory.outside_state()
        with closing(target_factory.make()) as tgt:
            tgt.start()
            apply_and_wait(tgt, CONFIG_B)
            with pytest.raises(TrialFailed):
                tgt.apply(REJECTED)
                tgt.wait_ready(10)
            tgt.close()
            assert target_factory.outside_state() == before

    def test_a_failed_start_leaves_nothing_behind(self, target_factory: TargetFactory) -> None:
        with closing(target_factory.make_unstartable()) as tgt:
            before = target_factory.outside_state()
            with pytest.raises(TargetError):
                tgt.start()
            assert target_factory.outside_state() == before
            tgt.close()
            tgt.restore()
            assert target_factory.outside_state() == before

    # -- service faults (scenarios) -------------------------------------------------------------

    def test_service_faults_act_on_traffic_and_leave_nothing_behind(self, target_factory: TargetFactory) -> None:
        before = target_factory.outside_state()
        with closing(target_factory.make()) as tgt:
            if not tgt.supports_service_faults:
                pytest.skip(f"the {tgt.name} target does not support service faults")
            tgt.start()
            tgt.set_service_faults(())  # always allowed, nothing in force
            tgt.set_service_faults([EndpointFault(endpoints=1, error_rate=1.0)])
            failing = burst(tgt.load_url, 12)
            assert failing[503] >= 1 and failing[200] >= 1, f"one endpoint answers 503 to all: {dict(failing)}"
            tgt.set_service_faults(())
            healed = burst(tgt.load_url, 12)
            assert healed == Counter({200: 12}), f"faults cleared: {dict(healed)}"
            tgt.set_service_faults([EndpointFault(endpoints=1, delay_ms=5)])
            tgt.close()  # with faults in force
            assert target_factory.outside_state() == before

    # -- errors --------------------------------------------------------------------------------

    def test_every_method_before_start_raises_target_error(self, target_factory: TargetFactory) -> None:
        with closing(target_factory.make()) as tgt:
            calls: dict[str, Callable[[], object]] = {
                "apply": lambda: tgt.apply(CONFIG_B), "wait_ready": lambda: tgt.wait_ready(1),
                "begin_window": tgt.begin_window, "end_window": tgt.end_window,
                "observed": tgt.observed, "load_url": lambda: tgt.load_url}
            for name, call in calls.items():
                with pytest.raises(TargetError):
                    call()
                    pytest.fail(f"{name} before start did not raise TargetError")

    def test_end_window_without_an_open_window_raises_target_error(self, target: Target) -> None:
        with pytest.raises(TargetError):
            target.end_window()
        target.begin_window()
        target.end_window()
        with pytest.raises(TargetError):
            target.end_window()  # the window was closed by the first end

    # -- measurement ---------------------------------------------------------------------------

    def test_the_window_is_exactly_the_span_between_begin_and_end(self, target: Target) -> None:
        t0 = time.time()
        target.begin_window()
        time.sleep(0.3)
        t1 = time.time()
        target.begin_window()  # starts the window again
        time.sleep(0.7)
        t2 = time.time()
        usage = target.end_window()
        assert t1 - 0.05 <= t2 - usage.window_s <= time.time()
        assert usage.window_s == pytest.approx(t2 - t1, abs=0.1), (usage.window_s, t2 - t0)

    def test_cpu_is_near_zero_when_idle_and_rises_with_traffic(self, target: Target) -> None:
        target.begin_window()
        time.sleep(1.0)
        idle = target.end_window()
        target.begin_window()
        served = drive(target.load_url, 1.0)
        busy = target.end_window()
        assert served > 0
        assert 0 <= idle.cpu_cores < 0.02, idle
        assert busy.cpu_cores > max(2 * idle.cpu_cores, 0.01), (idle, busy)
        assert 0 <= busy.throttled_ratio <= 1
