"""Sidecar CPU and server-side latency of one trial, read from Prometheus over the trial's window.

Every PromQL expression autotune sends is one of the templates below (``$name`` placeholders,
filled by :func:`render` with properly escaped values). They follow
shared/reference/istio-mapping.md §1d:

* sidecar CPU comes from cAdvisor (``container_cpu_usage_seconds_total``, ``container="istio-proxy"``)
  and is scoped to the pods of the trial's ReplicaSet by its ``pod-template-hash``
  (pods are named ``<deployment>-<hash>-<suffix>``), so a terminating pod of the previous trial
  does not leak into the sum;
* latency is measured at the server's own sidecars (``reporter="destination"``).

CPU and throttling cover exactly ``[start, end]``: the reader fetches each counter's raw samples
around the window and takes its value at ``start`` and at ``end`` by linear interpolation between
the samples that bracket them (counter resets handled), so no part of the window is left out. A
window's last part only reaches Prometheus with the first scrape after ``end``:
:meth:`PrometheusReader.wait_until_scraped` waits for it (at most one scrape interval plus a
margin) and must be called before reading a window that just ended. Latency quantiles are
``rate()`` over ``[W]`` (``W = round(end - start)`` whole seconds) evaluated at ``end``. Keep
``W >= 4 × scrape_interval`` (a shorter window is logged as a warning); with no samples the trial
fails with reason ``metrics``.

The bearer token is read from ``prometheus.tokenFile`` or the environment variable
``prometheus.tokenEnv`` at every call (so a rotated projected token is picked up), sent as an
``Authorization`` header and never logged or put in an error message.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from pathlib import Path
from string import Template
from typing import Any

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.spec import PrometheusSpec

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# All PromQL in one place. Placeholders: $namespace, $workload (escaped string bodies), $pods (an
# escaped RE2 pattern, anchored by Prometheus), $window (e.g. "300s"), $quantile (e.g. "0.95").
# --------------------------------------------------------------------------------------------------

#: Raw samples of the sidecars' CPU-seconds counters (one series per pod) over the range.
SIDECAR_CPU_SAMPLES = Template(
    'container_cpu_usage_seconds_total{namespace="$namespace", container="istio-proxy", pod=~"$pods"}[$window]'
)
#: Raw samples of the sidecars' CFS period counters (only exist with a CPU limit).
SIDECAR_PERIODS_SAMPLES = Template(
    'container_cpu_cfs_periods_total{namespace="$namespace", container="istio-proxy", pod=~"$pods"}[$window]'
)
#: Raw samples of the sidecars' throttled CFS period counters.
SIDECAR_THROTTLED_SAMPLES = Template(
    "container_cpu_cfs_throttled_periods_total{"
    'namespace="$namespace", container="istio-proxy", pod=~"$pods"}[$window]'
)
#: When the least recently scraped sidecar CPU series was last scraped (Unix time).
SIDECAR_CPU_LAST_SCRAPE = Template(
    'min(timestamp(container_cpu_usage_seconds_total{namespace="$namespace", container="istio-proxy", '
    'pod=~"$pods"}))'
)

#: A latency quantile (ms) of the workload as measured at its own (server-side) sidecars.
SERVER_LATENCY_MS = Template(
    "histogram_quantile($quantile, sum by (le) (rate(istio_request_duration_milliseconds_bucket{"
    'reporter="destination", destination_workload_namespace="$namespace", '
    'destination_workload="$workload"}[$window])))'
)

#: Pod names of one ReplicaSet of the Deployment (``$deployment`` and ``$hash`` regex-escaped).
TRIAL_PODS = Template("$deployment-$hash-.*")
#: Pod names of any ReplicaSet of the Deployment (when the trial's hash is not known).
ANY_PODS = Template("$deployment-[a-z0-9]+-[a-z0-9]+")

_RE2_META = frozenset("\\.+*?()|[]{}^$")


def promql_string(value: str) -> str:
    """The body of a double-quoted PromQL string literal holding ``value``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def regex_literal(value: str) -> str:
    """An RE2 pattern matching ``value`` literally."""
    return "".join("\\" + c if c in _RE2_META else c for c in value)


def pods_pattern(deployment: str, pod_template_hash: str | None) -> str:
    """The (unescaped-for-PromQL) regex of the pods to count: the trial's ReplicaSet if known."""
    if pod_template_hash:
        return TRIAL_PODS.substitute(deployment=regex_literal(deployment), hash=regex_literal(pod_template_hash))
    return ANY_PODS.substitute(deployment=regex_literal(deployment))


def render(template: Template, *, window_s: int | None = None, quantile: float | None = None,
           **labels: str) -> str:
    """Fill a template: label values become escaped string bodies, the window ``<n>s``."""
    values = {k: promql_string(v) for k, v in labels.items()}
    if window_s is not None:
        values["window"] = f"{window_s}s"
    if quantile is not None:
        values["quantile"] = repr(float(quantile))
    return template.substitute(values)


def window_seconds(start: float, end: float) -> int:
    """The range of a trial window in whole seconds (at least 1)."""
    if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
        raise ValueError(f"a measurement window needs start < end, got start={start}, end={end}")
    return max(1, round(end - start))


class PrometheusReader:
    """Reads one trial's metrics from Prometheus (see the module docstring for the queries)."""

    def __init__(self, spec: PrometheusSpec) -> None:
        self.spec = spec
        self.url = spec.url.rstrip("/")
        self._warned_windows: set[int] = set()

    # ---------------------------------------------------------------- public API

    def check(self) -> None:
        """Pre-flight: Prometheus answers a trivial query. Raises ``TargetError`` naming the URL."""
        try:
            result = self._query("vector(1)", at=None)
        except TrialFailed as exc:
            raise TargetError(str(exc).removeprefix("metrics: ")) from None
        ok = (isinstance(result, list) and len(result) == 1 and isinstance(result[0], dict)
              and _sample_value(result[0]) == 1.0)
        if not ok:
            raise TargetError(f"{self.url} does not look like Prometheus: 'vector(1)' answered {result!r:.200}")

    def settled_by(self, end: float) -> float:
        """When every sample of a window ending at ``end`` should be in Prometheus: one scrape
        interval plus a margin of a second (scrape duration, ingestion)."""
        return end + self.spec.scrape_interval + 1.0

    def wait_until_scraped(self, namespace: str, deployment: str, pod_template_hash: str | None,
                           end: float) -> None:
        """Block until every sidecar CPU series of the pods has a sample at or after ``end`` (the
        first scrape after the window), polling; give up at :meth:`settled_by` ``(end)`` and let
        the reading say what is missing."""
        promql = render(SIDECAR_CPU_LAST_SCRAPE, namespace=namespace,
                        pods=pods_pattern(deployment, pod_template_hash))
        deadline = self.settled_by(end)
        poll = min(1.0, max(0.05, self.spec.scrape_interval / 5))
        while True:
            last = self._value(promql, at=None)
            if last is not None and last >= end:
                return
            if time.time() >= deadline:
                logger.warning("Prometheus has not scraped the sidecars past the window's end %.1f s "
                               "after it (last scrape: %s)", time.time() - end, last)
                return
            time.sleep(poll)

    def sidecar_cpu_cores(self, namespace: str, deployment: str, pod_template_hash: str | None,
                          start: float, end: float) -> float:
        """CPU cores used by the sidecars of the trial's pods over exactly ``[start, end]`` (sum
        over pods), from each counter's values interpolated at both edges."""
        self._window(start, end)
        promql = self._samples_query(SIDECAR_CPU_SAMPLES, namespace, deployment, pod_template_hash,
                                     start, end)
        grown = [g for g in (_increase(s, start, end) for s in self._series(promql, end)) if g is not None]
        if not grown:
            raise TrialFailed(FailReason.METRICS, f"query returned no data: {promql}")
        return sum(grown) / (end - start)

    def throttled_ratio(self, namespace: str, deployment: str, pod_template_hash: str | None,
                        start: float, end: float) -> float | None:
        """Share (0–1) of CFS periods in ``[start, end]`` in which the sidecars were throttled;
        ``None`` without data (no CPU limit means no CFS periods are counted)."""
        counts = []
        for template in (SIDECAR_THROTTLED_SAMPLES, SIDECAR_PERIODS_SAMPLES):
            promql = self._samples_query(template, namespace, deployment, pod_template_hash, start, end)
            counts.append(sum(_increase(s, start, end) or 0.0 for s in self._series(promql, end)))
        throttled, periods = counts
        return throttled / periods if periods > 0 else None

    def server_latency_ms(self, namespace: str, deployment: str, quantile: float,
                          start: float, end: float) -> float:
        """The ``quantile`` (e.g. 0.95) of request duration in ms measured at the workload's own sidecars."""
        if not 0 < quantile < 1:
            raise ValueError(f"a quantile is between 0 and 1 (exclusive), got {quantile}")
        promql = render(SERVER_LATENCY_MS, window_s=self._window(start, end), quantile=quantile,
                        namespace=namespace, workload=deployment)
        return self._required(promql, end, " (no requests in the window?)")

    def _required(self, promql: str, at: float, hint: str = "") -> float:
        """The query's single value at ``at``; ``TrialFailed(FailReason.METRICS, …)`` naming the query if
        there is no data or the value is not a number."""
        value = self._value(promql, at)
        if value is None:
            raise TrialFailed(FailReason.METRICS, f"query returned no data: {promql}")
        if not math.isfinite(value):
            raise TrialFailed(FailReason.METRICS, f"query returned {value}{hint}: {promql}")
        return value

    # ---------------------------------------------------------------- internals

    def _window(self, start: float, end: float) -> int:
        w = window_seconds(start, end)
        minimum = 4 * self.spec.scrape_interval
        if w < minimum and w not in self._warned_windows:
            self._warned_windows.add(w)
            logger.warning("measurement window of %ds is shorter than 4 × the scrape interval (%gs): "
                        "Prometheus rates over it are noisy or empty", w, self.spec.scrape_interval)
        return w

    def _samples_query(self, template: Template, namespace: str, deployment: str,
                       pod_template_hash: str | None, start: float, end: float) -> str:
        """A raw-samples query evaluated at :meth:`settled_by` ``(end)`` reaching one scrape
        interval (plus margin) before ``start``, so both edges are bracketed."""
        reach = self.settled_by(end) - start + self.spec.scrape_interval + 1.0
        return render(template, window_s=math.ceil(reach), namespace=namespace,
                      pods=pods_pattern(deployment, pod_template_hash))

    def _series(self, promql: str, end: float) -> list[list[tuple[float, float]]]:
        """Each series' ``(time, value)`` samples of a range query evaluated at ``settled_by(end)``."""
        result = self._query(promql, self.settled_by(end))
        out = []
        for item in result or []:
            try:
                out.append([(float(t), float(v)) for t, v in item["values"]])
            except (KeyError, TypeError, ValueError):
                raise TrialFailed(FailReason.METRICS, f"unexpected series from Prometheus: {item!r:.200}") from None
        return out

    def _headers(self) -> dict[str, str]:
        token: str | None = None
        if self.spec.token_file:
            try:
                token = Path(self.spec.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise TrialFailed(FailReason.METRICS, f"cannot read the Prometheus token file {self.spec.token_file}: "
                                             f"{exc.strerror}") from None
        elif self.spec.token_env:
            token = os.environ.get(self.spec.token_env, "").strip()
            if not token:
                raise TrialFailed(FailReason.METRICS,
                                  f"the Prometheus token variable {self.spec.token_env} is unset or empty")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _value(self, promql: str, at: float | None) -> float | None:
        result = self._query(promql, at)
        if not result:
            return None
        if len(result) != 1:
            raise TrialFailed(FailReason.METRICS, f"query returned {len(result)} series, expected one: {promql}")
        value = _sample_value(result[0])
        logger.debug("prometheus %s @%s = %s", promql, at, value)
        return value

    def _query(self, promql: str, at: float | None) -> Any:
        params = {"timeout": f"{self.spec.timeout:g}"}
        if at is not None:
            params["time"] = f"{at:.3f}"
        retry = Retry(total=2, connect=2, read=0, status=2, backoff_factor=0.25,
                      status_forcelist=(502, 503, 504), raise_on_status=False)
        try:
            with PrometheusConnect(url=self.url, headers=self._headers(), retry=retry,
                                   timeout=self.spec.timeout) as prom:  # type: ignore[arg-type]
                return prom.custom_query(promql, params=params)
        except PrometheusApiClientException as exc:
            raise TrialFailed(FailReason.METRICS, f"Prometheus at {self.url} rejected the query "
                                         f"({_api_error(str(exc))}): {promql}") from None
        except requests.exceptions.JSONDecodeError:
            raise TrialFailed(FailReason.METRICS, f"{self.url} does not look like Prometheus "
                                         f"(its answer to /api/v1/query is not JSON)") from None
        except (KeyError, TypeError):
            raise TrialFailed(FailReason.METRICS, f"{self.url} does not look like Prometheus "
                                         f"(its answer to /api/v1/query has no data.result)") from None
        except requests.exceptions.RequestException as exc:
            raise TrialFailed(FailReason.METRICS, f"Prometheus at {self.url} unreachable: {_describe(exc)}") from None


def _increase(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """How much one counter grew over ``[start, end]``: its reset-adjusted value interpolated
    linearly at both edges (a series that starts or stops inside counts from/to its own samples);
    ``None`` for a series that does not reach into the window (a pod gone before it began)."""
    adjusted: list[tuple[float, float]] = []
    offset = 0.0
    for i, (t, v) in enumerate(samples):
        if i and v < samples[i - 1][1]:  # a counter reset (the container restarted)
            offset += samples[i - 1][1]
        adjusted.append((t, v + offset))
    inside = [t for t, _ in adjusted if start <= t <= end]
    if not adjusted or (not inside and (adjusted[0][0] > end or adjusted[-1][0] < start)):
        return None
    return max(0.0, _value_at(adjusted, end) - _value_at(adjusted, start))


def _value_at(samples: list[tuple[float, float]], t: float) -> float:
    """A counter's value at ``t``, linear between the samples bracketing it (clamped at the ends)."""
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return samples[-1][1]


def _sample_value(sample: dict[str, Any]) -> float:
    """The value of one instant-vector sample (``"NaN"`` and ``"+Inf"`` included)."""
    try:
        return float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise TrialFailed(FailReason.METRICS, f"unexpected sample from Prometheus: {sample!r:.200}") from None


_STATUS_RE = re.compile(r"HTTP Status Code (\d+) \((.*)\)$", re.S)


def _api_error(text: str) -> str:
    """``HTTP 400: bad_data: parse error …`` from the client's exception text."""
    m = _STATUS_RE.match(text)
    if not m:
        return text[:300]
    status, body = m.groups()
    hint = ""
    if status in ("401", "403"):
        hint = " (authentication refused: check prometheus.tokenFile / tokenEnv)"
    detail = re.search(r'"error"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    return f"HTTP {status}{hint}" + (f": {detail.group(1)}" if detail else "")


def _describe(exc: BaseException) -> str:
    """The root cause of a connection error, without the request it came from."""
    root: BaseException = exc
    seen = set()
    while True:
        nxt = getattr(root, "reason", None) or root.__cause__ or root.__context__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        seen.add(id(nxt))
        root = nxt
    text = str(root)
    # urllib3's NewConnectionError reads "<HTTPConnection object at 0x…>: Failed to establish …"
    text = re.sub(r"^<[^>]*>:\s*", "", text)
    return text or type(exc).__name__
