"""Sidecar CPU and server-side latency of one trial, read from Prometheus over the trial's window.

Every PromQL expression autotune sends is one of the templates below (``$name`` placeholders,
filled by :func:`render` with properly escaped values). They follow
shared/reference/istio-mapping.md §1d:

* sidecar CPU comes from cAdvisor (``container_cpu_usage_seconds_total``, ``container="istio-proxy"``)
  and is scoped to the pods of the trial's ReplicaSet by its ``pod-template-hash``
  (pods are named ``<deployment>-<hash>-<suffix>``), so a terminating pod of the previous trial
  does not leak into the sum;
* latency is measured at the server's own sidecars (``reporter="destination"``).

Each value is an instant query evaluated at the window's ``end`` over a range ``[W]`` with
``W = round(end - start)`` whole seconds. ``rate()`` needs at least two samples in the range and is
only trustworthy over several: keep ``W >= 4 × scrape_interval`` (a shorter window is logged as a
warning; with fewer than two samples the query has no data and the trial fails with reason
``metrics``). Samples reach Prometheus one scrape after they happen: query no earlier than
:meth:`PrometheusReader.settled_at` ``(end)``.

The bearer token is read from ``prometheus.tokenFile`` or the environment variable
``prometheus.tokenEnv`` at every call (so a rotated projected token is picked up), sent as an
``Authorization`` header and never logged or put in an error message.
"""

from __future__ import annotations

import logging
import math
import os
import re
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

#: CPU cores used by the sidecars of the selected pods, summed over pods, averaged over the window.
SIDECAR_CPU_CORES = Template(
    "sum(rate(container_cpu_usage_seconds_total{"
    'namespace="$namespace", container="istio-proxy", pod=~"$pods"}[$window]))'
)

#: Share of CFS periods in which the sidecars were throttled (only exists with a CPU limit).
SIDECAR_THROTTLED_RATIO = Template(
    "sum(rate(container_cpu_cfs_throttled_periods_total{"
    'namespace="$namespace", container="istio-proxy", pod=~"$pods"}[$window]))'
    " / sum(rate(container_cpu_cfs_periods_total{"
    'namespace="$namespace", container="istio-proxy", pod=~"$pods"}[$window]))'
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


def render(template: Template, *, window_s: int, quantile: float | None = None, **labels: str) -> str:
    """Fill a template: label values become escaped string bodies, the window ``<n>s``."""
    values = {k: promql_string(v) for k, v in labels.items()}
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

    def sidecar_cpu_cores(self, namespace: str, deployment: str, pod_template_hash: str | None,
                          start: float, end: float) -> float:
        """CPU cores used by the sidecars of the trial's pods over ``[start, end]`` (sum over pods)."""
        promql = render(SIDECAR_CPU_CORES, window_s=self._window(start, end), namespace=namespace,
                        pods=pods_pattern(deployment, pod_template_hash))
        return self._required(promql, end)

    def throttled_ratio(self, namespace: str, deployment: str, pod_template_hash: str | None,
                        start: float, end: float) -> float | None:
        """Share (0–1) of CFS periods in which the sidecars were throttled; ``None`` without data
        (no CPU limit means no CFS periods are counted)."""
        promql = render(SIDECAR_THROTTLED_RATIO, window_s=self._window(start, end), namespace=namespace,
                        pods=pods_pattern(deployment, pod_template_hash))
        value = self._value(promql, end)
        if value is None or not math.isfinite(value):
            return None
        return value

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

    def settled_at(self, end: float) -> float:
        """When the samples of a window ending at ``end`` have all been scraped (one scrape
        interval plus a second of margin): wait until then before reading the window."""
        return end + self.spec.scrape_interval + 1.0

    def query_value(self, promql: str, at: float) -> float | None:
        """Any instant query returning one sample: its value at ``at``, or ``None`` if empty."""
        return self._value(promql, at)

    # ---------------------------------------------------------------- internals

    def _window(self, start: float, end: float) -> int:
        w = window_seconds(start, end)
        minimum = 4 * self.spec.scrape_interval
        if w < minimum and w not in self._warned_windows:
            self._warned_windows.add(w)
            logger.warning("measurement window of %ds is shorter than 4 × the scrape interval (%gs): "
                        "Prometheus rates over it are noisy or empty", w, self.spec.scrape_interval)
        return w

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

    def _value(self, promql: str, at: float) -> float | None:
        result = self._query(promql, at)
        if not result:
            return None
        if len(result) != 1:
            raise TrialFailed(FailReason.METRICS, f"query returned {len(result)} series, expected one: {promql}")
        value = _sample_value(result[0])
        logger.debug("prometheus %s @%.3f = %s", promql, at, value)
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
