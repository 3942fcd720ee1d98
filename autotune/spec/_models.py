"""Study specs (``search-spaces/*.yaml``): parsed once, at the edge, into typed models.

A ``StudySpec`` is valid by construction: ``StudySpec.model_validate`` applies every rule (the
parameters' ranges against Istio's limits, cross-field rules, the timing bounds) and reports each
broken rule with its field path. ``parse_spec`` only turns pydantic's errors into one ``SpecError``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from autotune.errors import SpecError
from autotune.mesh import (
    DEFAULT_CPU_LIMIT,
    PARAMETERS,
    ParamInfo,
    ServiceRef,
    SidecarResources,
    format_cpu,
    parse_cpu,
)
from autotune.spec._duration import duration, format_duration, parse_duration
from autotune.spec._storage_url import check_storage_url

logger = logging.getLogger(__name__)
DEFAULT_STORAGE = "sqlite:///trials/autotune.db"
#: Largest spec or locustfile read (checked before reading: a spec is a page, not a data set).
MAX_FILE_BYTES = 1 << 20
#: A Kubernetes measurement window spans at least this many Prometheus scrape intervals.
MIN_SCRAPES_PER_WINDOW = 4
_LOCUSTFILE_IMPORT_RE = re.compile(
    r"^\s*(import\s+autotune\.load\.locustfile\b|from\s+autotune\.load\.locustfile\s+import\b"
    r"|from\s+autotune\.load\s+import\s+.*\blocustfile\b)", re.MULTILINE)


class RuleBroken(ValueError):
    """One or more rules broken below the validator that raises it: ``(path, rule)`` pairs, each
    path relative to that validator's own location (``field`` names it, for the text of ``str()``)."""

    def __init__(self, problems: list[tuple[str, str]], field: str = "") -> None:
        self.problems, self.field = problems, field
        super().__init__("; ".join(f"{_join(field, path)}: {rule}" for path, rule in problems))


def _join(base: str, path: str) -> str:
    if not base or not path:
        return base or path
    return base + path if path.startswith("[") else f"{base}.{path}"


def _refuse_moved(data: Any, moved: dict[str, str]) -> Any:
    """Name the new home of a renamed field (``moved`` maps old key → message), not "extra field"."""
    if isinstance(data, dict):
        problems = [(str(key), moved[key]) for key in data if key in moved]
        if problems:
            raise RuleBroken(problems)
    return data


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class StudySettings(_Model):
    """Which study, where it is stored, how it searches. ``storage`` is checked when the spec is
    read (scheme, driver installed, SQLite path); see ``check_storage_url``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    storage: str = DEFAULT_STORAGE
    sampler: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    trials: int = Field(default=10, ge=1, le=10000)
    seed: int | None = None
    results_dir: str = "trials"
    #: Optuna artifact store (a directory) for each trial's files; default ``<resultsDir>/artifacts``.
    artifacts_dir: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage(cls, url: str) -> str:
        problems = check_storage_url(url)
        if problems:
            raise ValueError("; ".join(problems))
        return url


class ParamRange(_Model):
    """Search range of one parameter as written in the spec; ``StudySpec`` checks it against the
    parameter's rules and keeps the typed ``SearchParam``. A ``choice`` parameter
    (``loadBalancer.simple``) lists ``choices`` instead of ``low``/``high``; a duration is written
    with its unit (``250ms``, ``1s``, whole milliseconds); ``proxy.cpuLimit`` may add
    ``unset: true`` so the search also tries no CPU limit at all."""

    type: Literal["int", "cpu", "duration", "choice"] | None = None
    low: int | float | str | None = None
    high: int | float | str | None = None
    log: bool = False
    step: int | float | str | None = None
    choices: list[str] | None = None
    unset: bool = False


class SearchParam(BaseModel):
    """One parameter of the search space, validated, in numbers (CPU in cores)."""

    model_config = ConfigDict(frozen=True)
    name: str
    info: ParamInfo
    low: float
    high: float
    log: bool = False
    step: float | None = None
    #: ``choice`` parameters: the values searched.
    choices: tuple[str, ...] = ()
    #: ``proxy.cpuLimit``: the search may also pick no limit (``"unset"``).
    unset: bool = False


# -- objectives and constraints (scenario-aware; see "scenarios" below) -----------------------------

#: What every scenario measures, by name; an objective or constraint names one, optionally
#: prefixed by its scenario (``surge.goodput_rps``). Unprefixed names mean the first scenario.
SCENARIO_METRICS = (
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "latency_p50_corrected_ms", "latency_p95_corrected_ms", "latency_p99_corrected_ms",
    "goodput_rps", "goodput_slo_rps", "error_rate", "achieved_rps", "throughput_ratio",
    "cpu_used_cores", "cpu_requested_cores", "cpu_limit_cores", "cpu_per_1k_rps",
    "cpu_cores", "cpu_reserved_cores",
)
#: Deprecated objective names → the name that says what they are (still accepted).
DEPRECATED_METRICS = {"cpu_cores": "cpu_used_cores", "cpu_reserved_cores": "cpu_limit_cores"}
#: Metrics that are better when larger: their objective is maximized unless a direction is given.
MAXIMIZED_METRICS = frozenset({"goodput_rps", "goodput_slo_rps", "achieved_rps", "throughput_ratio"})


class Objective(_Model):
    """One objective: a metric, ``[scenario.]name`` (see ``SCENARIO_METRICS``), and a direction
    (default: maximize for goodput and throughput, minimize for the rest)."""

    metric: str
    direction: Literal["minimize", "maximize"] = "minimize"

    @field_validator("metric")
    @classmethod
    def _deprecated(cls, metric: str) -> str:
        name = metric.partition(".")[2] or metric
        if name in DEPRECATED_METRICS:
            logger.warning("objective %s is deprecated: it is the CPU %s; write %s", metric,
                           "used" if name == "cpu_cores" else "limit (not what is reserved)",
                           metric.replace(name, DEPRECATED_METRICS[name]))
        return metric

    @model_validator(mode="before")
    @classmethod
    def _default_direction(cls, data: Any) -> Any:
        if isinstance(data, dict) and "direction" not in data and isinstance(data.get("metric"), str):
            name = data["metric"].partition(".")[2] or data["metric"]
            return {**data, "direction": "maximize" if name in MAXIMIZED_METRICS else "minimize"}
        return data


def _objective(value: Any) -> Any:
    if isinstance(value, str):
        return {"metric": value}
    if isinstance(value, dict) and len(value) == 1:  # ``- surge.goodput_rps: maximize``
        (metric, direction), = value.items()
        if metric != "metric" and isinstance(direction, str):
            return {"metric": metric, "direction": direction}
    return value


class Constraints(_Model):
    """A trial is feasible only if every rule holds; fast 503s must never look good.

    ``max_throttled_ratio`` (off unless given): the largest share of the proxy's CFS periods
    (100 ms each) in which its CPU quota ran out, in the measurement's worst window. A config
    throttled in more periods sits at the throttling knee, where its latency changes from one
    proxy start to the next (bench/RESULTS.md, "Measurement noise")."""

    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    min_throughput_ratio: float = Field(default=0.95, ge=0, le=1)
    max_throttled_ratio: float | None = Field(default=None, ge=0, le=1)


class ConstraintOverride(_Model):
    """A scenario's own rules; a rule left out (``None``) is the common one."""

    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    min_throughput_ratio: float | None = Field(default=None, ge=0, le=1)
    max_throttled_ratio: float | None = Field(default=None, ge=0, le=1)

    def over(self, common: Constraints) -> Constraints:
        """These rules where given, ``common`` for the rest."""
        return common.model_copy(update=self.model_dump(exclude_none=True))


_RULE_KEYS = frozenset({"maxErrorRate", "max_error_rate", "minThroughputRatio", "min_throughput_ratio",
                        "maxThrottledRatio", "max_throttled_ratio"})


class ConstraintSpec(Constraints):
    """``constraints:`` the rules every scenario must meet, and per scenario (by name) the rules
    that differ there, e.g. ``{maxErrorRate: 0.01, surge: {minThroughputRatio: 0.5}}``."""

    scenarios: dict[str, ConstraintOverride] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "scenarios" in data:
            return data
        return {**{k: v for k, v in data.items() if k in _RULE_KEYS},
                "scenarios": {k: v for k, v in data.items() if k not in _RULE_KEYS}}

    def rules_for(self, scenario: str) -> Constraints:
        """The rules of one scenario: its own where given, the common ones otherwise."""
        common = Constraints.model_validate(self.model_dump(include=set(Constraints.model_fields)))
        own = self.scenarios.get(scenario)
        return own.over(common) if own is not None else common


class LoadSpec(_Model):
    """A fixed, paced Locust load: ``users`` each sending ``rate_per_user`` requests/s. How long it
    runs is in ``timing`` (``warmup``, ``window``). ``locustfile`` is relative to the spec file and
    must import ``autotune.load.locustfile`` (which records every request)."""

    users: int = Field(default=10, ge=1, le=5000)
    rate_per_user: float | None = Field(default=None, gt=0)
    target_rps: float | None = Field(default=None, gt=0)
    path: str = Field(default="/", pattern=r"^/")
    locustfile: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _refuse_moved(data, {
            "warmup": "moved to timing.warmup",
            "duration": "moved to timing.window (one measurement window)",
        })

    @model_validator(mode="after")
    def _one_rate(self) -> LoadSpec:
        if self.rate_per_user is not None and self.target_rps is not None:
            raise ValueError("give either ratePerUser or targetRps, not both")
        if self.rate_per_user is None and self.target_rps is None:
            object.__setattr__(self, "rate_per_user", 10.0)
        return self

    @property
    def per_user_rate(self) -> float:
        """Requests per second each user sends."""
        if self.target_rps is not None:
            return self.target_rps / self.users
        assert self.rate_per_user is not None
        return self.rate_per_user

    @property
    def offered_rps(self) -> float:
        return self.per_user_rate * self.users


# --- the local service model (upstream endpoints and their faults) --------------------------


class ServiceTime(_Model):
    """How long an endpoint works on one request (slept, never burned): ``fixed`` at ``mean_ms``,
    ``exponential`` with that mean, or ``lognormal`` with that mean and shape ``sigma`` (the
    standard deviation of the log)."""

    distribution: Literal["fixed", "exponential", "lognormal"] = "fixed"
    mean_ms: float = Field(default=5.0, ge=0, le=60000)
    sigma: float = Field(default=0.5, gt=0, le=3)


class EndpointFault(_Model):
    """``endpoints`` of the service's endpoints misbehaving the same way: each request takes
    ``delay_ms`` more and its service time times ``service_time_factor`` (the worker is held all
    that time), or is answered ``503`` (share ``error_rate``) or has its connection reset before
    any response (share ``reset_rate``); with ``refuse_connections`` the endpoint refuses every
    connection, as a replica whose process died while it is still in the service's endpoints.
    Istio's default retry policy retries only the refused connections (on another endpoint);
    503 responses and resets reach the client. A list of faults applies to disjoint endpoints in
    order: the first fault to the first ``endpoints`` endpoints, the next to the ones after them."""

    endpoints: int = Field(default=1, ge=1, le=16)
    delay_ms: float = Field(default=0.0, ge=0, le=60000)
    service_time_factor: float = Field(default=1.0, gt=0, le=1000)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    reset_rate: float = Field(default=0.0, ge=0, le=1)
    refuse_connections: bool = False

    @model_validator(mode="after")
    def _rates(self) -> EndpointFault:
        if self.error_rate + self.reset_rate > 1:
            raise ValueError(f"errorRate + resetRate must be at most 1, but got "
                             f"(errorRate={self.error_rate}, resetRate={self.reset_rate})")
        return self


class UpstreamSpec(_Model):
    """Real HTTP endpoints on loopback standing in for the service's pods, each an app server
    with ``workers`` concurrent workers and a FIFO queue in front of them (at most
    ``queue_limit`` waiting requests, beyond which it answers ``503``; ``None``: unbounded).
    ``serviceTimeMs: x`` is short for ``serviceTime: {distribution: fixed, meanMs: x}``.
    ``faults`` are the endpoint faults in force by default (a scenario may set others)."""

    endpoints: int = Field(default=2, ge=1, le=16)
    service_time: ServiceTime = ServiceTime()
    workers: int = Field(default=8, ge=1, le=10000)
    queue_limit: int | None = Field(default=None, ge=0, le=1_000_000)
    response_bytes: int = Field(default=128, ge=0, le=1_000_000)
    faults: tuple[EndpointFault, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _service_time_ms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        keys = [k for k in ("serviceTimeMs", "service_time_ms") if k in data]
        if not keys:
            return data
        if "serviceTime" in data or "service_time" in data:
            raise RuleBroken([(keys[0], "give either serviceTimeMs or serviceTime, not both")])
        if len(keys) > 1:
            raise RuleBroken([(keys[1], "give serviceTimeMs once")])
        rest = {k: v for k, v in data.items() if k != keys[0]}
        rest["serviceTime"] = {"distribution": "fixed", "meanMs": data[keys[0]]}
        return rest

    @model_validator(mode="after")
    def _faults_fit(self) -> UpstreamSpec:
        faulty = sum(f.endpoints for f in self.faults)
        if faulty > self.endpoints:
            raise ValueError(f"faults name {faulty} endpoints but there are only "
                             f"endpoints={self.endpoints}")
        return self

    @property
    def service_time_ms(self) -> float:
        """The mean service time in ms."""
        return self.service_time.mean_ms


class LocalTargetSpec(_Model):
    """The embedded default: a real Envoy on 127.0.0.1 whose CPU limit is a cgroup quota."""

    kind: Literal["local"] = "local"
    upstream: UpstreamSpec = UpstreamSpec()
    envoy_binary: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        moved = "moved to timing.proxyStartTimeout (Envoy start-up)"
        return _refuse_moved(data, {"readyTimeout": moved, "ready_timeout": moved})


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class PrometheusSpec(_Model):
    """Where sidecar CPU (cAdvisor) and, optionally, server-side latency are read.
    The bearer token comes from a file (``tokenFile``) or an environment variable (``tokenEnv``,
    its name without ``$``), never from the spec itself; at most one of the two."""

    url: str = Field(pattern=r"^https?://")
    token_file: str | None = None
    token_env: str | None = Field(default=None, pattern=_ENV_NAME)
    server_latency: bool = False
    #: Prometheus' scrape interval; a Kubernetes measurement window must span at least 4 of them.
    scrape_interval: Annotated[float, duration(at_most=600, positive=True)] = 15.0
    #: Timeout of one Prometheus query.
    timeout: Annotated[float, duration(at_most=600, positive=True)] = 30.0

    @model_validator(mode="after")
    def _one_token_source(self) -> PrometheusSpec:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("give either tokenFile or tokenEnv, not both (the token has one source)")
        return self


class KubernetesTargetSpec(_Model):
    """Istio on a staging cluster. The namespace must be labelled ``autotune.io/staging: "true"``."""

    kind: Literal["kubernetes"]
    #: kubeconfig file; default ``$KUBECONFIG`` or ``~/.kube/config``. Ignored with ``inCluster``.
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool = False
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    deployment: str
    destination_rule: str
    host: str
    #: The URL the load is sent to (the only address load goes to).
    service_url: str = Field(pattern=r"^https?://")
    prometheus: PrometheusSpec
    #: How often the Deployment is read while waiting for a rollout.
    poll_interval: Annotated[float, duration(at_most=60, positive=True)] = 2.0
    #: Timeout of one Kubernetes API request.
    request_timeout: Annotated[float, duration(at_most=600, positive=True)] = 30.0

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        rollout = "moved to timing.rolloutTimeout"
        return _refuse_moved(data, {
            "settle": "moved to timing.xdsPush (the wait for a DestinationRule-only change to reach "
                      "the sidecars)",
            "rolloutTimeout": rollout, "rollout_timeout": rollout,
        })
    #: Admin endpoint of the client sidecar (the istio-proxy of the pod autotune runs in), read
    #: to check that a DestinationRule change reached it (``timing.xdsPush`` is then only the
    #: upper bound). Default: ``http://127.0.0.1:15000`` with ``inCluster``, else none
    #: (``timing.xdsPush`` is slept). ``""`` turns the check off.
    sidecar_admin_url: str | None = Field(default=None, pattern=r"^(https?://.+)?$")
    #: The Deployment behind the service (``service.name``'s Service selects its pods): a
    #: scenario's faults add misbehaving replicas copied from it. Default: ``service.name``.
    service_deployment: str | None = Field(default=None, pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
    #: The VirtualService of ``host`` that tuned route settings (``retries.*``) are written to;
    #: created (and deleted again) if it does not exist. Default: ``service.name``.
    virtual_service: str | None = Field(default=None, pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")


TargetSpec = Annotated[LocalTargetSpec | KubernetesTargetSpec, Field(discriminator="kind")]


class Timing(_Model):
    """How long each phase of a trial lasts or may take, named for what it waits for.

    A trial: apply the config → wait until it serves traffic (``readyTimeout``; on Kubernetes a pod
    template change waits for its rollout, ``rolloutTimeout``, and a DestinationRule-only change
    for the xDS push, ``xdsPush``; the local target waits for Envoy, ``proxyStartTimeout``) → pause
    ``settle`` → load: ``warmup``, then measurement windows of ``window`` each (the load may
    overrun its planned length by ``loadGrace`` before the trial fails).

    Durations are seconds (a bare number) or strings with a unit: ``500ms``, ``30s``, ``10min``,
    ``1h``; ``m`` alone is refused (it means millicores for CPU). Each has an upper bound.
    """

    #: Load before the first measurement window, not measured (connections, JIT, caches).
    warmup: Annotated[float, duration(at_most=600)] = 5.0
    #: One measurement window; a trial runs ``measurement.repeats`` of them back to back.
    window: Annotated[float, duration(at_most=3600, positive=True)] = 20.0
    #: Apply → the config serves traffic; a trial that is not ready by then fails (``not-ready``).
    ready_timeout: Annotated[float, duration(at_most=3600, positive=True)] = 60.0
    #: A pause after the target is ready and before the load starts.
    settle: Annotated[float, duration(at_most=600)] = 0.0
    #: Kubernetes: the wait for a DestinationRule-only change to reach the sidecars (xDS push).
    xds_push: Annotated[float, duration(at_most=600)] = 10.0
    #: Kubernetes: a rollout of a changed pod template must finish within this (``rollout-failed``).
    rollout_timeout: Annotated[float, duration(at_most=3600, positive=True)] = 600.0
    #: Local: Envoy must start and answer on its admin port within this (``proxy-start``).
    proxy_start_timeout: Annotated[float, duration(at_most=600, positive=True)] = 30.0
    #: How much longer than warm-up + windows the load may run before the trial fails (``load``).
    load_grace: Annotated[float, duration(at_most=600)] = 30.0

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return _refuse_moved(data, {"duration": "is called timing.window (one measurement window)"})


class MeasurementSpec(_Model):
    """Noise control: how often each config is measured and how results are checked.

    Each trial runs ``repeats`` back-to-back windows after one warm-up and keeps the median of
    each metric; if the p95's coefficient of variation is above ``target_cv`` it runs more windows,
    up to ``max_repeats``. Every ``drift_every`` trials the baseline is measured again; a change
    of its p95 beyond ``drift_threshold`` is reported, and each trial is compared with the
    nearest baseline. At the end, the Pareto configs (at most ``confirm_max_configs``: the best of
    each objective in turn) and the baseline are re-measured interleaved (``confirm_rounds``
    rounds of A B1 B2 …) and a config is *confirmed* only if its gain over the baseline holds at
    ``confidence``. With ``early_abort``, a config that breaks a constraint
    in the first window of a scenario is not measured further (see ``early_abort``).
    """

    repeats: int = Field(default=3, ge=1, le=50)
    max_repeats: int = Field(default=5, ge=1, le=100)
    target_cv: float = Field(default=0.05, ge=0, le=1)
    drift_every: int = Field(default=5, ge=0, le=1000)
    drift_threshold: float = Field(default=0.10, gt=0, le=10)
    confirm_rounds: int = Field(default=3, ge=0, le=20)
    confirm_max_configs: int = Field(default=4, ge=1, le=50)
    confidence: float = Field(default=0.90, gt=0.5, lt=1)
    #: A config (not the baseline) that breaks a constraint in the first window of a scenario
    #: stops there: its remaining windows and scenarios are skipped, and the trial is recorded
    #: infeasible with the constraint values measured (``aborted_after``).
    early_abort: bool = True
    #: Stop the search before ``study.trials`` once the feasible Pareto front has not grown beyond
    #: the measurement noise for this many trials in a row (``autotune.study._stop``). Unset: the
    #: command's default (off for ``study start``, ``DEFAULT_STOP_AFTER_FLAT`` for
    #: ``study run-scheduled``); 0: off.
    stop_after_flat: int | None = Field(default=None, ge=0, le=1000)

    @model_validator(mode="after")
    def _bounds(self) -> MeasurementSpec:
        if self.max_repeats < self.repeats:
            raise ValueError(f"maxRepeats >= repeats must hold, got maxRepeats={self.max_repeats}, "
                             f"repeats={self.repeats}")
        return self


# -- scenarios -------------------------------------------------------------------------------------

class LoadOverride(_Model):
    """A scenario's load: the fields given replace the top-level ``load``'s (a rate given here,
    ``ratePerUser`` or ``targetRps``, replaces both of its rate fields)."""

    users: int | None = Field(default=None, ge=1, le=5000)
    rate_per_user: float | None = Field(default=None, gt=0)
    target_rps: float | None = Field(default=None, gt=0)
    path: str | None = Field(default=None, pattern=r"^/")


class ScenarioSpec(_Model):
    """One named scenario of a trial: a fixed load (``load`` over the top-level one), its own
    ``warmup``, ``window`` and number of ``windows`` (default: ``timing`` and ``measurement``;
    without ``windows`` the noise control adds windows up to ``maxRepeats``), a latency ``slo``
    for ``goodput_slo_rps`` (default: the top-level ``slo``), and service ``faults`` (endpoint
    faults, as in ``target.upstream.faults``; the target puts them in force before the scenario
    and its default faults back after it, ``Target.set_service_faults``)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")
    load: LoadOverride | None = None
    warmup: Annotated[float, duration(at_most=600)] | None = None
    window: Annotated[float, duration(at_most=3600, positive=True)] | None = None
    windows: int | None = Field(default=None, ge=1, le=50)
    slo: Annotated[float, duration(at_most=600, positive=True)] | None = None
    faults: list[EndpointFault] = Field(default_factory=list, max_length=16)


class Scenario(BaseModel):
    """A scenario resolved against the spec's defaults (what a trial runs); ``windows`` is
    ``None`` when the noise control decides (``measurement.repeats`` … ``maxRepeats``)."""

    model_config = ConfigDict(frozen=True)
    name: str
    load: LoadSpec
    warmup: float
    window: float
    windows: int | None
    slo_ms: float | None
    faults: tuple[EndpointFault, ...] = ()
    constraints: Constraints


DEFAULT_SCENARIO = "steady"


def split_metric(metric: str, scenarios: list[str]) -> tuple[str, str]:
    """``(scenario, metric)`` of an objective's or column's name; unprefixed means the first
    scenario. Raises ``ValueError`` naming the scenarios or metrics that exist."""
    scenario, dot, name = metric.partition(".")
    if not dot:
        scenario, name = scenarios[0], metric
    elif scenario not in scenarios:
        raise ValueError(f"no scenario {scenario!r} (scenarios: {', '.join(scenarios)})")
    if name not in SCENARIO_METRICS:
        raise ValueError(f"unknown metric {name!r}; each scenario measures {', '.join(SCENARIO_METRICS)}")
    return scenario, name


class StudySpec(_Model):
    """A whole study spec file, valid by construction (see the module docstring)."""

    study: StudySettings
    service: ServiceRef = ServiceRef()
    sidecar: SidecarResources = SidecarResources()
    parameters: dict[str, ParamRange] = Field(min_length=1)
    objectives: list[Annotated[Objective, BeforeValidator(_objective)]] = Field(
        default_factory=lambda: [Objective(metric="latency_p95_ms"), Objective(metric="cpu_used_cores")],
        min_length=1,
    )
    constraints: ConstraintSpec = ConstraintSpec()
    load: LoadSpec = LoadSpec()
    #: Latency SLO of ``goodput_slo_rps`` for every scenario without its own.
    slo: Annotated[float, duration(at_most=600, positive=True)] | None = None
    #: What a trial runs, in order, on the same applied config; default: one, ``steady``, the
    #: top-level load and timing.
    scenarios: list[ScenarioSpec] = Field(default_factory=list, max_length=16)
    timing: Timing = Timing()
    measurement: MeasurementSpec = MeasurementSpec()
    target: TargetSpec = LocalTargetSpec()
    #: Set by the loader: the file this spec came from (for relative paths and messages).
    source: str = Field(default="<memory>", exclude=True)
    _space: list[SearchParam] = PrivateAttr(default_factory=list)
    _scenarios: list[Scenario] = PrivateAttr(default_factory=list)

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, ranges: dict[str, ParamRange]) -> dict[str, ParamRange]:
        problems: list[tuple[str, str]] = []
        for name, r in ranges.items():
            problems += [(f'["{name}"]{path}', rule) for path, rule in _search_param(name, r)[1]]
        if problems:
            raise RuleBroken(problems, field="parameters")
        return ranges

    @field_validator("objectives")
    @classmethod
    def _unique_objectives(cls, objectives: list[Objective]) -> list[Objective]:
        first: dict[str, int] = {}
        problems: list[tuple[str, str]] = []
        for i, o in enumerate(objectives):
            if o.metric in first:
                problems.append((f"[{i}]", f"{o.metric} is already objectives[{first[o.metric]}]; "
                                           "each metric may be an objective once"))
            first.setdefault(o.metric, i)
        if problems:
            raise RuleBroken(problems, field="objectives")
        return objectives

    @model_validator(mode="after")
    def _cross_field(self) -> StudySpec:
        self._space = [p for name, r in self.parameters.items()
                       if (p := _search_param(name, r)[0]) is not None]
        problems = self._cpu_request_rule() + self._window_rule() + self._locustfile_rule()
        problems += self._scenario_rules()
        if problems:
            raise RuleBroken(problems)
        self._scenarios = [self._resolve(i, s) for i, s in enumerate(self._scenario_specs())]
        return self

    # -- scenarios (delimited: objectives, constraints and scenarios) ------------------------------
    def _scenario_specs(self) -> list[ScenarioSpec]:
        return self.scenarios or [ScenarioSpec(name=DEFAULT_SCENARIO)]

    def _resolve(self, index: int, s: ScenarioSpec) -> Scenario:
        load = self.load
        if s.load is not None:
            given = s.load.model_dump(exclude_none=True)
            base = self.load.model_dump()
            if {"rate_per_user", "target_rps"} & given.keys():
                base.pop("rate_per_user"), base.pop("target_rps")
            load = LoadSpec.model_validate({**base, **given})
        return Scenario(name=s.name, load=load,
                        warmup=self.timing.warmup if s.warmup is None else s.warmup,
                        window=self.timing.window if s.window is None else s.window,
                        windows=s.windows, slo_ms=None if (slo := s.slo or self.slo) is None else slo * 1000,
                        faults=tuple(s.faults), constraints=self.constraints.rules_for(s.name))

    def _scenario_rules(self) -> list[tuple[str, str]]:
        """Scenario names unique; constraints and objectives name scenarios and metrics that exist;
        a goodput_slo_rps objective has an SLO; faults fit the local upstream."""
        specs = self._scenario_specs()
        names = [s.name for s in specs]
        problems: list[tuple[str, str]] = []
        for i, n in enumerate(names):
            if n in names[:i]:
                problems.append((f"scenarios[{i}].name", f"{n!r} is already scenarios[{names.index(n)}]"))
        for key in self.constraints.scenarios:
            if key not in names:
                problems.append((f"constraints.{key}", f"no scenario {key!r} (scenarios: {', '.join(names)})"))
        slo = {s.name: (s.slo or self.slo) for s in specs}
        for i, o in enumerate(self.objectives):
            try:
                scenario, metric = split_metric(o.metric, names)
            except ValueError as exc:
                problems.append((f"objectives[{i}].metric", str(exc)))
                continue
            if metric == "goodput_slo_rps" and slo[scenario] is None:
                problems.append((f"objectives[{i}].metric", f"goodput_slo_rps needs a latency SLO: set slo "
                                 f"at the top level or on scenario {scenario!r}"))
        if isinstance(self.target, LocalTargetSpec):
            have = self.target.upstream.endpoints
            for i, s in enumerate(specs):
                faulty = sum(f.endpoints for f in s.faults)
                if faulty > have:
                    problems.append((f"scenarios[{i}].faults", f"faults name {faulty} endpoints but there are "
                                     f"only {have} (target.upstream.endpoints)"))
        return problems

    def scenario_list(self) -> list[Scenario]:
        """The scenarios a trial runs, in order, resolved (at least one: ``steady``)."""
        return list(self._scenarios)

    def _cpu_request_rule(self) -> list[tuple[str, str]]:
        cpu = next((p for p in self._space if p.name == "proxy.cpuLimit"), None)
        lowest = cpu.low if cpu is not None else DEFAULT_CPU_LIMIT
        request = next((p for p in self._space if p.name == "proxy.cpuRequest"), None)
        if request is not None:  # the searched request replaces sidecar.cpuRequest
            if request.high <= lowest:
                return []
            limit = (f'the lowest proxy.cpuLimit searched ({format_cpu(lowest)})' if cpu is not None
                     else f"Istio's default CPU limit {format_cpu(lowest)} (proxy.cpuLimit is not searched)")
            return [('parameters["proxy.cpuRequest"].high',
                     f"must be <= {limit}: Kubernetes refuses a request above its limit, so every "
                     f"request searched must fit under every limit searched; got {format_cpu(request.high)}")]
        if self.sidecar.cpu_request_cores <= lowest:
            return []
        given = "" if "cpu_request" in self.sidecar.model_fields_set else " (the default)"
        where = (f'the lowest proxy.cpuLimit searched (parameters["proxy.cpuLimit"].low = {format_cpu(lowest)})'
                 if cpu is not None
                 else f"Istio's default CPU limit {format_cpu(lowest)} (proxy.cpuLimit is not searched)")
        return [("sidecar.cpuRequest", f"must be <= {where}: Kubernetes refuses a request above its limit; "
                 f"got {self.sidecar.cpu_request}{given}. Lower sidecar.cpuRequest"
                 + (" or raise the low end of the range" if cpu is not None else ""))]

    def _window_rule(self) -> list[tuple[str, str]]:
        if not isinstance(self.target, KubernetesTargetSpec):
            return []
        scrape = self.target.prometheus.scrape_interval
        if self.timing.window >= MIN_SCRAPES_PER_WINDOW * scrape:
            return []
        return [("timing.window", f"must span at least {MIN_SCRAPES_PER_WINDOW} Prometheus scrape intervals "
                 f"(target.prometheus.scrapeInterval = {format_duration(scrape)}), i.e. >= "
                 f"{format_duration(MIN_SCRAPES_PER_WINDOW * scrape)}; got {format_duration(self.timing.window)}")]

    def _locustfile_rule(self) -> list[tuple[str, str]]:
        if not self.load.locustfile:
            return []
        problem = _check_locustfile(self.locustfile_path())
        return [("load.locustfile", problem)] if problem else []

    def search_space(self) -> list[SearchParam]:
        """The validated parameters, in spec order (CPU values in cores), computed at validation."""
        return list(self._space)

    def locustfile_path(self) -> Path:
        """The locustfile to run: the spec's (relative to the spec file) or the built-in paced one."""
        if self.load.locustfile:
            p = Path(self.load.locustfile)
            return p if p.is_absolute() else Path(self.source).parent / p
        return Path(__file__).parents[1] / "load" / "locustfile.py"

    def with_overrides(self, **changes: Any) -> StudySpec:
        """A copy with dotted-path overrides, e.g. ``{"study.trials": 3, "timing.window": 5}``,
        validated like the file itself."""
        data = self.model_dump(by_alias=False, exclude={"source"})
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return parse_spec(data, self.source)


def _check_locustfile(path: Path) -> str | None:
    """Why ``path`` cannot be autotune's locustfile, or ``None``: it must be a readable ``.py`` file
    of at most ``MAX_FILE_BYTES`` that compiles and imports ``autotune.load.locustfile``."""
    if not path.is_file():
        return f"{path} does not exist (a relative path is relative to the spec file)" if not path.exists() \
            else f"{path} is not a file"
    if path.suffix != ".py":
        return f"{path} is not a Python file (.py); Locust imports the locustfile as a module"
    if path.stat().st_size > MAX_FILE_BYTES:
        return f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB"
    try:
        source = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    try:
        compile(source, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        line = f" at line {exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
        return f"{path} is not valid Python{line}: {exc.msg if isinstance(exc, SyntaxError) else exc}"
    if not _LOCUSTFILE_IMPORT_RE.search(source):
        return (f"{path} does not import autotune.load.locustfile, so nothing would be measured; add "
                "'import autotune.load.locustfile  # noqa: F401' to it")
    return None


def _search_param(name: str, r: ParamRange) -> tuple[SearchParam | None, list[tuple[str, str]]]:
    """The typed parameter, or the rules it breaks (Istio's and Optuna's), each with its sub-path."""
    info = PARAMETERS.get(name)
    if info is None:
        return None, [("", f"unknown parameter; known parameters are {', '.join(PARAMETERS)}")]
    if r.type is not None and r.type != info.kind:
        return None, [(".type", f"{name} is of type {info.kind!r}, not {r.type!r}")]
    if r.unset and name != "proxy.cpuLimit":
        return None, [(".unset", f"only proxy.cpuLimit can be left unset (no limit), not {name}")]
    if info.kind == "choice":
        return _choice_param(name, info, r)
    if r.choices is not None:
        return None, [(".choices", f"{name} is a range ({info.kind}); give low and high, not choices")]
    missing = [(f".{key}", "is required") for key in ("low", "high") if getattr(r, key) is None]
    if missing:
        return None, missing
    problems: list[tuple[str, str]] = []
    values: dict[str, float] = {}
    for key in ("low", "high", "step"):
        raw = getattr(r, key)
        if raw is None:
            continue
        try:
            values[key] = _number(info, raw)
        except ValueError as exc:
            problems.append((f".{key}", str(exc)))
    if problems:
        return None, problems
    problems = _range_rules(info, values, r.log)
    if problems:
        return None, problems
    return SearchParam(name=name, info=info, low=values["low"], high=values["high"], log=r.log,
                       step=values.get("step"), unset=r.unset), []


def _choice_param(name: str, info: ParamInfo, r: ParamRange) -> tuple[SearchParam | None, list[tuple[str, str]]]:
    """A categorical parameter: ``choices`` only, each one of the values Istio accepts."""
    given = [key for key in ("low", "high", "step") if getattr(r, key) is not None] + (["log"] if r.log else [])
    if given:
        return None, [(f".{key}", f"{name} is a choice among {', '.join(info.choices)}; give choices, "
                       f"not {key}") for key in given]
    if not r.choices:
        return None, [(".choices", f"give at least one of {', '.join(info.choices)}")]
    problems = [(f".choices[{i}]", f"must be one of {', '.join(info.choices)}, got {c!r}")
                for i, c in enumerate(r.choices) if c not in info.choices]
    problems += [(f".choices[{i}]", f"{c!r} is listed twice") for i, c in enumerate(r.choices)
                 if c in r.choices[:i]]
    if problems:
        return None, problems
    return SearchParam(name=name, info=info, low=0, high=0, choices=tuple(r.choices)), []


def _number(info: ParamInfo, raw: int | float | str) -> float:
    if info.kind == "cpu":
        return parse_cpu(raw)
    if info.kind == "duration":
        if not isinstance(raw, str):
            raise ValueError(f"a duration setting is written with its unit ('250ms', '1s'), got {raw!r}")
        ms = parse_duration(raw) * 1000
        if abs(ms - round(ms)) > 1e-6:
            raise ValueError(f"Istio takes whole milliseconds, got {raw!r}")
        return float(round(ms))
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"must be a whole number, got {raw!r}")
    return float(raw)


def _range_rules(info: ParamInfo, values: dict[str, float], log: bool) -> list[tuple[str, str]]:
    low, high, step = values["low"], values["high"], values.get("step")
    problems: list[tuple[str, str]] = []
    if low < info.minimum:
        why = {"int": "Istio treats 0 as unset and istiod rejects negative limits" if info.minimum else
                      "istiod rejects negative values",
               "duration": "istiod and the CRD require at least 1ms",
               }.get(info.kind, "the local cgroup quota cannot go below 10m"
                     if info.name == "proxy.cpuLimit" else "Kubernetes CPU precision is 1m")
        problems.append((".low", f"must be >= {_fmt(info, info.minimum)} ({why}), got {_fmt(info, low)}"))
    if high > info.maximum:
        problems.append((".high", f"must be <= {_fmt(info, info.maximum)}, got {_fmt(info, high)}"))
    if low > high:
        problems.append(("", f"low <= high must hold, got low={_fmt(info, low)}, high={_fmt(info, high)}"))
    if step is None or problems:
        return problems
    if log:
        return [("", "log and step cannot be combined (Optuna samples one or the other)")]
    if step <= 0:
        return [(".step", "must be > 0")]
    span = high - low
    if step > span > 0:
        return [(".step", f"step <= high - low must hold (Optuna would collapse the range to low), got "
                          f"step={_fmt(info, step)}, high - low={_fmt(info, span)}")]
    scale = 1000 if info.kind == "cpu" else 1
    if round(span * scale) % round(step * scale) != 0:
        below = low + (span // step) * step
        return [(".high", f"high - low must be a multiple of step (Optuna would silently lower high to "
                          f"{_fmt(info, below)}), got low={_fmt(info, low)}, high={_fmt(info, high)}, "
                          f"step={_fmt(info, step)}")]
    return []


def _fmt(info: ParamInfo, value: float) -> str:
    if info.kind == "duration":
        return f"{int(value)}ms"
    return format_cpu(value) if info.kind == "cpu" else str(int(value))


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and loc[i - 1] == "target" and part in ("local", "kubernetes"):
            continue  # the discriminator's tag, not a field the user wrote
        elif "." in part:
            out += f'["{part}"]'
        else:
            out += ("." if out else "") + part
    return out


def spec_problems(exc: ValidationError) -> list[str]:
    """Each broken rule of a failed ``StudySpec`` validation as ``path: rule``."""
    problems: list[str] = []
    for e in exc.errors():
        where = _format_loc(e["loc"])
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, RuleBroken):
            problems += [f"{_join(where, path) or '(top level)'}: {rule}" for path, rule in cause.problems]
        elif isinstance(cause, ValueError):
            problems.append(f"{where or '(top level)'}: {cause}")
        else:
            problems.append(f"{where or '(top level)'}: {e['msg']}")
    return problems


def parse_spec(data: Any, source: str = "<memory>") -> StudySpec:
    """Validate an already-loaded document; raise ``SpecError`` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): a study spec is a mapping with at least 'study' and 'parameters'"])
    try:
        return StudySpec.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise SpecError(source, spec_problems(exc)) from None
