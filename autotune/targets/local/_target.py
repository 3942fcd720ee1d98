"""The local target: a real Envoy on 127.0.0.1 standing in for a client sidecar.

Upstream endpoints (the service's pods) run for the whole study. Each ``apply`` restarts Envoy,
because concurrency is a bootstrap-time setting (in Istio, a pod restart), with the cluster Istio
would generate and the CPU limit enforced as a cgroup CPU quota. CPU use is read from the cgroup.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from autotune.errors import FailReason, TargetError, TrialFailed, UnsupportedParameter
from autotune.mesh import (
    HPO_KEY,
    ISTIO_UNSET_LIMIT,
    MeshConfig,
    cluster_name,
    envoy_cluster,
    envoy_route,
)
from autotune.spec import EndpointFault, LocalTargetSpec, SearchParam, ServiceRef, Timing
from autotune.targets._base import Observed, ProxyUsage, Target
from autotune.targets.local._cgroup import (
    NAME_PREFIX,
    CgroupSupport,
    CpuCgroup,
    CpuSample,
    detect,
)
from autotune.targets.local._counters import deltas, read_counters
from autotune.targets.local._envoy import EnvoyProcess, find_envoy_binary, render_bootstrap
from autotune.targets.local._leftovers import TMP_PREFIX, Ledger, sweep
from autotune.targets.local._upstream import FAULT_HEADER, Faults, UpstreamProcess

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"


class LocalTarget(Target):
    """Real Envoy + real upstream processes on loopback, CPU limited by a cgroup quota.

    Every process it starts is recorded in ``started_pids`` and stopped by PID in ``close`` (also
    registered with ``atexit``); each dies with this process (parent-death signal), and what a
    killed run leaves (cgroup, temp dir) is listed in a ledger that the next ``start`` sweeps.
    Not thread-safe.
    """

    name = "local"

    def __init__(self, spec: LocalTargetSpec, service: ServiceRef, *, timing: Timing | None = None) -> None:
        self.spec = spec
        self.timing = timing or Timing()
        self.service = service
        self.baseline = MeshConfig()
        #: PIDs of every process this target started (Envoy runs and upstream endpoints).
        self.started_pids: list[int] = []
        self._binary: str | None = None
        self._support: CgroupSupport | None = None
        self._cgroup: CpuCgroup | None = None
        self._tmp: Path | None = None
        self._upstreams: list[UpstreamProcess] = []
        self._envoy: EnvoyProcess | None = None
        self._listener_port: int | None = None
        self._applied: MeshConfig | None = None
        self._window_start: CpuSample | None = None
        self._window_counters: dict[str, int] | None = None
        self._faults: tuple[EndpointFault, ...] = spec.upstream.faults
        self._runs = 0
        self._ledger: Ledger | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Check the Envoy binary and cgroup support, start the upstreams and a baseline Envoy.

        Raises ``TargetError`` saying what to fix; leaves no process, cgroup or file behind.
        """
        if self._closed:
            raise TargetError("this local target was closed; create a new one")
        if self._started:
            return
        atexit.register(self.close)
        try:
            self._binary = find_envoy_binary(self.spec.envoy_binary)
            sweep()
            self._ledger = Ledger()
            self._support = detect()
            if self._support.available:
                self._cgroup = CpuCgroup.create(NAME_PREFIX, self._support)
                self._ledger.add_cgroup(self._cgroup.dirs)
            else:
                logger.warning("no writable CPU cgroup (%s): the proxy's CPU limit is not enforced "
                               "and its CPU use is read from the process", self._support.reason)
            self._tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
            self._ledger.add_dir(self._tmp)
            up = self.spec.upstream
            per_endpoint = endpoint_faults(self._faults, up.endpoints)
            for faults in per_endpoint:
                proc = UpstreamProcess(up.service_time.mean_ms, up.response_bytes, self._tmp,
                                       distribution=up.service_time.distribution,
                                       sigma=up.service_time.sigma, workers=up.workers,
                                       queue_limit=up.queue_limit, faults=faults)
                self._upstreams.append(proc)
                self._start_upstream(proc)
            self._started = True
            self.apply(self.baseline)
            self.wait_ready(self.timing.proxy_start_timeout)
        except TrialFailed as exc:
            self._close_quietly()
            raise TargetError(f"the baseline proxy (Istio defaults) did not start: {exc}") from exc
        except BaseException:
            self._close_quietly()
            raise
        logger.info("local target ready: %s -> %d upstream endpoint(s), cgroup %s",
                    self.load_url, len(self._upstreams),
                    self._cgroup.name if self._cgroup else "none")

    def check_supported(self, space: list[SearchParam]) -> None:
        """``proxy.cpuLimit`` needs a writable CPU cgroup, else ``UnsupportedParameter``."""
        if not any(p.name == "proxy.cpuLimit" for p in space):
            return
        support = self._support or detect()
        if not support.available:
            raise UnsupportedParameter(
                f"proxy.cpuLimit cannot be enforced by the local target on this machine: "
                f"{support.reason}. The limit is a cgroup CPU quota; run as root with cgroup v1 "
                "cpu/cpuacct or a cgroup v2 cpu controller you may write to, or remove "
                "proxy.cpuLimit from the search space.")

    def apply(self, config: MeshConfig) -> None:
        """Restart Envoy with ``config``: quota = ``effective_cpu_limit`` cores, workers =
        ``effective_concurrency``, the cluster from ``mapping.envoy_cluster``.

        Raises ``TrialFailed(FailReason.PROXY_START, …)`` when Envoy rejects the config or exits.
        """
        self._require_started()
        if config.cpu_limit is not None and self._cgroup is None:
            reason = self._support.reason if self._support else "not checked"
            raise UnsupportedParameter(f"cannot enforce cpuLimit without a CPU cgroup: {reason}")
        self._stop_envoy()
        self._applied = None
        # Envoy starts unthrottled and gets its quota once it is live: start-up time is not what
        # a trial measures, and under 20m it would take seconds (about 70 ms of CPU).
        if self._cgroup is not None:
            self._cgroup.set_quota(None)
        endpoints = [(_HOST, u.port) for u in self._upstreams if u.port is not None]
        cluster = envoy_cluster(config, self.service, endpoints)
        self._start_envoy(config.effective_concurrency, cluster, envoy_route(config, self.service))
        if self._cgroup is not None:
            self._cgroup.set_quota(config.effective_cpu_limit)
        self._applied = config
        logger.debug("applied %s", config.describe())

    def _start_envoy(self, concurrency: int, cluster: dict[str, Any],
                     route: dict[str, Any] | None = None) -> None:
        assert self._binary is not None and self._tmp is not None
        port = self._listener_port or 0
        for attempt in range(2):
            self._runs += 1
            envoy = EnvoyProcess(self._binary, self._tmp / f"envoy-{self._runs}", concurrency)
            self._envoy = envoy
            try:
                envoy.start(render_bootstrap(cluster, port, route), self._cgroup, self.timing.proxy_start_timeout)
            except TrialFailed as exc:
                self._envoy = None
                if attempt == 0 and port and "ddress already in use" in str(exc):
                    logger.info("listener port %s taken; letting Envoy pick another", port)
                    port = 0
                    continue
                raise
            finally:
                self._record_pid(envoy.pid)
            self._listener_port = envoy.listener_port
            return

    def _start_upstream(self, proc: UpstreamProcess) -> None:
        try:
            proc.start()
        finally:
            self._record_pid(proc.pid)

    def _record_pid(self, pid: int | None) -> None:
        if pid is not None and pid not in self.started_pids:
            self.started_pids.append(pid)
            if self._ledger is not None:
                self._ledger.add_pid(pid)

    def wait_ready(self, timeout_s: float) -> None:
        """Return once a request through the listener gets the upstream's 200 and Envoy's admin
        shows the applied cluster config (circuit breakers, protocol options, workers).

        Raises ``TrialFailed(FailReason.PROXY_START, …)`` if Envoy died,
        ``TrialFailed(FailReason.UPSTREAM_DIED, …)`` if an upstream endpoint is not running,
        ``TrialFailed(FailReason.NOT_READY, …)`` after ``timeout_s`` and
        ``TrialFailed(FailReason.NOT_PROPAGATED, …)`` if Envoy runs another config than the one
        applied (checked once it serves: a restart is synchronous, there is nothing to wait for).
        """
        self._require_started()
        envoy = self._envoy
        if envoy is None or envoy.proc is None:
            raise TrialFailed(FailReason.NOT_READY, "no proxy is running (the last apply failed)")
        dead = [u for u in self._upstreams if not u.alive]
        if dead:
            raise TrialFailed(FailReason.UPSTREAM_DIED, "upstream endpoint(s) not running: " + ", ".join(
                f"pid {u.pid} on port {u.port} (code {u.returncode})" for u in dead))
        deadline = time.monotonic() + timeout_s
        per_request = max(5.0, 2 * self.spec.upstream.service_time_ms / 1000 + 5)
        last = "no attempt"
        while True:
            if envoy.proc.poll() is not None:
                raise TrialFailed(FailReason.PROXY_START, f"envoy exited with code {envoy.proc.returncode}:"
                                  f"\n{envoy.stderr_tail()}")
            left = deadline - time.monotonic()
            try:
                status = _get_status(_HOST, self._port(), min(per_request, max(left, 0.1)))
                if status in (200, _ENDPOINT_503):
                    self._check_propagated()
                    return
                last = f"HTTP {status}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TrialFailed(FailReason.NOT_READY, f"no 200 through {self.load_url} within "
                                  f"{timeout_s:.0f}s (last: {last})")
            time.sleep(0.05)

    @property
    def load_url(self) -> str:
        """``http://127.0.0.1:<listener port>``; stable across applies unless the port was taken."""
        return f"http://{_HOST}:{self._port()}"

    def _port(self) -> int:
        if self._listener_port is None:
            raise TargetError("the local target has no listener yet (call start first)")
        return self._listener_port

    # -- measurement -------------------------------------------------------------------------

    def begin_window(self) -> None:
        """Take the CPU sample the window starts from (a second call starts it again)."""
        self._require_started()
        self._window_counters = self._counters()
        self._window_start = self._sample()

    def end_window(self) -> ProxyUsage:
        """The proxy's CPU use since ``begin_window`` (cores = Δusage / Δtime), throttling.

        Raises ``TrialFailed(FailReason.PROXY_DIED, …)`` if Envoy is no longer running and
        ``TrialFailed(FailReason.UPSTREAM_DIED, …)`` if an upstream endpoint is not: the window's
        errors would be the crash's, not the config's. ``restore()`` starts what died again.
        """
        self._require_started()
        if self._window_start is None:
            raise TargetError("end_window called without begin_window")
        s0, c0 = self._window_start, self._window_counters
        self._window_start = self._window_counters = None
        self.check_alive()
        s1 = self._sample()
        c1 = self._counters()
        dt = s1.time_monotonic - s0.time_monotonic
        return ProxyUsage(
            cpu_cores=(s1.usage_s - s0.usage_s) / dt if dt > 0 else 0.0,
            window_s=dt,
            periods=s1.periods - s0.periods,
            throttled_periods=s1.throttled_periods - s0.throttled_periods,
            throttled_s=s1.throttled_s - s0.throttled_s,
            extra=deltas(c0, c1) if c0 is not None and c1 is not None else {},
        )

    def _counters(self) -> dict[str, int] | None:
        """Envoy's cluster counters now (outside the CPU sample), ``None`` if unreadable."""
        if self._envoy is None:
            return None
        try:
            return read_counters(self._envoy, cluster_name(self.service))
        except TargetError as exc:
            logger.warning("%s; this window has no envoy counters", exc)
            return None

    # -- the service's endpoints -------------------------------------------------------------

    def set_endpoint_faults(self, faults: Sequence[EndpointFault]) -> None:
        """Make the endpoints misbehave as ``faults`` say, from now on, on the running endpoints
        (no restart; an endpoint started again keeps them): the first fault applies to the first
        ``faults[0].endpoints`` endpoints, the next to the following ones, the rest behave.
        ``[]`` heals every endpoint; ``restore`` puts back the spec's ``target.upstream.faults``.

        Raises ``TargetError`` if the faults name more endpoints than there are, or an endpoint
        does not take them.
        """
        self._require_started()
        per_endpoint = endpoint_faults(faults, len(self._upstreams))
        for upstream, fault in zip(self._upstreams, per_endpoint, strict=True):
            if upstream.alive:
                upstream.set_faults(fault)
            else:
                upstream.faults = fault  # taken when restore() starts it again
        self._faults = tuple(faults)
        logger.info("endpoint faults: %s", [f.model_dump(by_alias=True, exclude_defaults=True)
                                            for f in faults] or "none")

    supports_service_faults = True

    def set_service_faults(self, faults: Sequence[EndpointFault]) -> None:
        """A scenario's faults (see ``Target.set_service_faults``), in place of the spec's
        ``target.upstream.faults``; ``()`` puts those back."""
        self.set_endpoint_faults(faults if faults else self.spec.upstream.faults)

    @property
    def endpoint_faults(self) -> tuple[EndpointFault, ...]:
        """The endpoint faults in force (the spec's ``target.upstream.faults`` after start)."""
        return self._faults

    @property
    def endpoint_pids(self) -> list[int]:
        """PIDs of the running upstream endpoints, in endpoint order."""
        return [u.pid for u in self._upstreams if u.pid is not None and u.alive]

    def endpoint_stats(self) -> list[dict[str, int]]:
        """Each endpoint's own counts (served, queued, overflow_503, fault_503, fault_reset,
        max_queue, busy, waiting), for diagnostics and tests."""
        self._require_started()
        return [u.stats() for u in self._upstreams]

    def _check_propagated(self) -> None:
        if self._applied is None:
            return
        want = Observed.expected(self._applied)
        have = self.observed()
        # Without a cgroup no CPU limit is enforced (start warned; apply refuses a cpuLimit).
        diffs = [d for d in want.differences(have)
                 if self._cgroup is not None or not d.startswith("proxy.cpuLimit")]
        if diffs:
            raise TrialFailed(FailReason.NOT_PROPAGATED, "envoy does not run the applied cluster config "
                              "(applied != running): " + "; ".join(diffs))

    def check_alive(self) -> None:
        """Raise ``TrialFailed`` (``PROXY_DIED`` / ``UPSTREAM_DIED``) naming the dead process and
        quoting its last log lines, if Envoy or an upstream endpoint has exited."""
        envoy = self._envoy
        if envoy is None or envoy.proc is None or envoy.proc.poll() is not None:
            code = envoy.proc.returncode if envoy is not None and envoy.proc is not None else None
            tail = envoy.stderr_tail() if envoy is not None else ""
            raise TrialFailed(FailReason.PROXY_DIED, f"envoy (pid {envoy.pid if envoy else None}) exited "
                              f"with code {code} during the measurement window:\n{tail}")
        dead = [u for u in self._upstreams if not u.alive]
        if dead:
            raise TrialFailed(FailReason.UPSTREAM_DIED, "upstream endpoint(s) exited during the "
                              "measurement window: " + ", ".join(
                                  f"pid {u.pid} on port {u.port} (code {u.returncode})" for u in dead))

    def _sample(self) -> CpuSample:
        if self._cgroup is not None:
            return self._cgroup.sample()
        if self._envoy is None or self._envoy.pid is None:
            raise TargetError("no proxy is running to measure")
        now = time.monotonic()
        t = psutil.Process(self._envoy.pid).cpu_times()
        return CpuSample(now, t.user + t.system, 0, 0, 0.0)

    def observed(self) -> Observed:
        """Read back from the running Envoy: circuit breakers from ``/clusters`` (Istio's unset
        4294967295 → ``None``), ``max_requests_per_connection`` from ``/config_dump``, workers
        from ``/server_info``; the CPU limit is the cgroup quota read from the kernel."""
        self._require_started()
        envoy = self._envoy
        if envoy is None or envoy.proc is None or envoy.proc.poll() is not None:
            raise TrialFailed(FailReason.NOT_READY, "no proxy is running (the last apply failed)")
        name = cluster_name(self.service)
        try:
            breakers = envoy.circuit_breakers(name)
            hpo = envoy.cluster_config(name).get("typed_extension_protocol_options", {}).get(HPO_KEY, {})
            workers = int(envoy.server_info()["command_line_options"]["concurrency"])
        except (OSError, ValueError, KeyError) as exc:
            raise TrialFailed(FailReason.NOT_READY, f"cannot read envoy's admin endpoint: {exc}") from exc
        per_conn = (hpo.get("common_http_protocol_options") or {}).get("max_requests_per_connection")

        def limit(key: str) -> int | None:
            value = breakers.get(key)
            return None if value is None or value == ISTIO_UNSET_LIMIT else int(value)

        pool = MeshConfig(max_connections=limit("max_connections"),
                          http1_max_pending_requests=limit("max_pending_requests"),
                          http2_max_requests=limit("max_requests"),
                          max_requests_per_connection=int(per_conn) if per_conn is not None else None,
                          max_retries=limit("max_retries"))
        quota = self._cgroup.quota_cores() if self._cgroup is not None else None
        return Observed(pool=pool, concurrency=workers, cpu_limit=quota,
                        details={"circuit_breakers": breakers, "envoy_pid": envoy.pid,
                                 "cgroup": self._cgroup.name if self._cgroup else None})

    # -- access for tests and diagnostics ----------------------------------------------------

    @property
    def envoy(self) -> EnvoyProcess | None:
        """The running Envoy (admin helpers), if any."""
        return self._envoy

    @property
    def cgroup(self) -> CpuCgroup | None:
        """The proxy's cgroup, if cgroups are supported here."""
        return self._cgroup

    # -- teardown ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Start again every upstream endpoint that died, then run the baseline (Istio defaults)
        again; no-op before start, after close, or when the baseline already runs with every
        endpoint alive. Raises ``TargetError`` if an endpoint or the baseline proxy does not start."""
        if not self._started or self._closed:
            return
        envoy = self._envoy
        dead = [u for u in self._upstreams if not u.alive]
        defaults = self.spec.upstream.faults
        if (not dead and self._applied == self.baseline and envoy is not None
                and envoy.proc is not None and envoy.proc.poll() is None and self._faults == defaults):
            return
        for upstream in dead:
            logger.warning("upstream endpoint pid %s (port %s) died with code %s; starting it again",
                           upstream.pid, upstream.port, upstream.returncode)
            upstream.stop()
            self._start_upstream(upstream)
        if self._faults != defaults:
            self.set_endpoint_faults(defaults)
        try:
            self.apply(self.baseline)
            self.wait_ready(self.timing.proxy_start_timeout)
        except TrialFailed as exc:
            raise TargetError(f"could not restore the baseline proxy (Istio defaults): {exc}") from exc

    def close(self) -> None:
        """Stop Envoy and the upstreams by PID, remove the cgroup and temp files. Idempotent;
        safe at any point. Every step runs; if one failed, ``TargetError`` names them after."""
        if self._closed:
            return
        self._closed = True
        self._started = False
        steps = [self._stop_envoy, *(u.stop for u in self._upstreams), self._remove_cgroup,
                 self._remove_tmp]
        failures = []
        for step in steps:
            try:
                step()
            except Exception as exc:
                logger.exception("local target cleanup step failed")
                failures.append(f"{type(exc).__name__}: {exc}")
        atexit.unregister(self.close)
        if self._ledger is not None and not failures:
            self._ledger.discard()
        if failures:
            raise TargetError("the local target could not release everything: " + "; ".join(failures))

    def _close_quietly(self) -> None:
        """``close`` after a failed start: the start's error is the one to report."""
        try:
            self.close()
        except TargetError as exc:
            logger.error("%s", exc)

    def _stop_envoy(self) -> None:
        """Stop the running Envoy; its quota is lifted first so a throttled proxy exits promptly."""
        envoy, self._envoy = self._envoy, None
        if envoy is None:
            return
        if self._cgroup is not None:
            try:
                self._cgroup.set_quota(None)
            except TargetError as exc:
                logger.warning("cannot lift the CPU quota before stopping envoy: %s", exc)
        envoy.stop()

    def _remove_cgroup(self) -> None:
        if self._cgroup is not None:
            self._cgroup.remove()

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _require_started(self) -> None:
        if not self._started or self._closed:
            raise TargetError("the local target is not running (call start first)")


def endpoint_faults(faults: Sequence[EndpointFault], endpoints: int) -> list[Faults]:
    """What each of ``endpoints`` endpoints does under ``faults`` (in order, disjoint).

    Raises ``TargetError`` if the faults name more endpoints than there are.
    """
    named = sum(f.endpoints for f in faults)
    if named > endpoints:
        raise TargetError(f"the endpoint faults name {named} endpoints but the service has "
                          f"{endpoints}")
    out: list[Faults] = []
    for f in faults:
        out += [Faults(delay_ms=f.delay_ms, service_time_factor=f.service_time_factor,
                       error_rate=f.error_rate, reset_rate=f.reset_rate,
                       refuse_connections=f.refuse_connections)] * f.endpoints
    return out + [Faults()] * (endpoints - named)


#: ``_get_status`` of a 503 the endpoint itself answered (a fault or its full queue): the route
#: through Envoy works.
_ENDPOINT_503 = -503


def _get_status(host: str, port: int, timeout_s: float) -> int:
    """Status of one ``GET /`` on a fresh connection (``_ENDPOINT_503`` for an endpoint's 503)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        if resp.status == 503 and resp.getheader(FAULT_HEADER):
            return _ENDPOINT_503
        return resp.status
    finally:
        with contextlib.suppress(OSError):
            conn.close()
