"""Study specs (``search-spaces/*.yaml``): parsed once, at the edge, into typed models.

Every problem is reported with the file, the field path and the rule broken, before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from autotune.errors import SpecError
from autotune.mesh import PARAMETERS, ParamInfo, ServiceRef, SidecarResources, format_cpu, parse_cpu

DEFAULT_STORAGE = "sqlite:///trials/autotune.db"
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)?\s*$")


def _seconds(value: Any) -> Any:
    """Accept ``30``, ``"30s"``, ``"500ms"`` or ``"2m"`` and return seconds."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"a duration is a number of seconds or '30s', '500ms', '2m'; got {value!r}")
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
        return float(m.group(1)) * scale
    return value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class StudySettings(_Model):
    """Which study, where it is stored, how it searches."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    storage: str = DEFAULT_STORAGE
    sampler: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    trials: int = Field(default=10, ge=1, le=10000)
    seed: int | None = None
    results_dir: str = "trials"
    #: Optuna artifact store (a directory) for each trial's files; default ``<resultsDir>/artifacts``.
    artifacts_dir: str | None = None


class ParamRange(_Model):
    """Search range of one parameter as written in the spec (checked against Istio's rules later)."""

    type: Literal["int", "cpu"] | None = None
    low: int | float | str
    high: int | float | str
    log: bool = False
    step: int | float | str | None = None


class SearchParam(BaseModel):
    """One parameter of the search space, validated, in numbers (CPU in cores)."""

    model_config = ConfigDict(frozen=True)
    name: str
    info: ParamInfo
    low: float
    high: float
    log: bool = False
    step: float | None = None


Metric = Literal["latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cpu_cores",
                 "cpu_reserved_cores"]


class Objective(_Model):
    metric: Metric
    direction: Literal["minimize", "maximize"] = "minimize"


def _objective(value: Any) -> Any:
    return {"metric": value} if isinstance(value, str) else value


class Constraints(_Model):
    """A trial is feasible only if every rule holds; fast 503s must never look good."""

    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    min_throughput_ratio: float = Field(default=0.95, ge=0, le=1)


class LoadSpec(_Model):
    """A fixed, paced Locust load: ``users`` each sending ``rate_per_user`` requests/s."""

    users: int = Field(default=10, ge=1, le=5000)
    rate_per_user: float | None = Field(default=None, gt=0)
    target_rps: float | None = Field(default=None, gt=0)
    warmup: Seconds = 5.0
    duration: Annotated[float, BeforeValidator(_seconds), Field(gt=0)] = 20.0
    path: str = Field(default="/", pattern=r"^/")
    locustfile: str | None = None

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


class UpstreamSpec(_Model):
    """Real HTTP endpoints on loopback standing in for the service's pods."""

    endpoints: int = Field(default=2, ge=1, le=16)
    service_time_ms: float = Field(default=5.0, ge=0, le=60000)
    response_bytes: int = Field(default=128, ge=0, le=1_000_000)


class LocalTargetSpec(_Model):
    """The embedded default: a real Envoy on 127.0.0.1 whose CPU limit is a cgroup quota."""

    kind: Literal["local"] = "local"
    upstream: UpstreamSpec = UpstreamSpec()
    envoy_binary: str | None = None
    ready_timeout: Seconds = 30.0


class PrometheusSpec(_Model):
    """Where sidecar CPU (cAdvisor) and, optionally, server-side latency are read.
    The bearer token comes from a file or an environment variable, never from the spec itself."""

    url: str = Field(pattern=r"^https?://")
    token_file: str | None = None
    token_env: str | None = None
    server_latency: bool = False
    #: Prometheus' scrape interval; the measurement window must span at least 4 of them.
    scrape_interval: Seconds = 15.0
    timeout: Seconds = 30.0


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
    #: Time for a DestinationRule-only change to reach the sidecars (xDS push).
    settle: Seconds = 10.0
    rollout_timeout: Seconds = 600.0
    #: How often the Deployment is read while waiting for a rollout.
    poll_interval: Annotated[float, BeforeValidator(_seconds), Field(gt=0)] = 2.0
    request_timeout: Seconds = 30.0


TargetSpec = Annotated[LocalTargetSpec | KubernetesTargetSpec, Field(discriminator="kind")]


class Timing(_Model):
    """How long each phase of a trial may take before the trial is failed."""

    ready_timeout: Seconds = 60.0
    settle: Seconds = 0.0
    load_grace: Seconds = 30.0


class MeasurementSpec(_Model):
    """Noise control: how often each config is measured and how results are checked.

    Each trial runs ``repeats`` back-to-back windows after one warm-up and keeps the median of
    each metric; if the p95's coefficient of variation is above ``target_cv`` it runs more windows,
    up to ``max_repeats``. Every ``drift_every`` trials the baseline is measured again; a change
    of its p95 beyond ``drift_threshold`` is reported, and each trial is compared with the
    nearest baseline. At the end, the Pareto configs and the baseline are re-measured interleaved
    (``confirm_rounds`` rounds of A B1 B2 …) and a config is *confirmed* only if its gain over
    the baseline holds at ``confidence``.
    """

    repeats: int = Field(default=3, ge=1, le=50)
    max_repeats: int = Field(default=5, ge=1, le=100)
    target_cv: float = Field(default=0.05, ge=0, le=1)
    drift_every: int = Field(default=5, ge=0, le=1000)
    drift_threshold: float = Field(default=0.10, gt=0, le=10)
    confirm_rounds: int = Field(default=3, ge=0, le=20)
    confirm_max_configs: int = Field(default=4, ge=1, le=50)
    confidence: float = Field(default=0.90, gt=0.5, lt=1)

    @model_validator(mode="after")
    def _bounds(self) -> MeasurementSpec:
        if self.max_repeats < self.repeats:
            raise ValueError(f"maxRepeats >= repeats must hold, got maxRepeats={self.max_repeats}, "
                             f"repeats={self.repeats}")
        return self


class StudySpec(_Model):
    """A whole study spec file."""

    study: StudySettings
    service: ServiceRef = ServiceRef()
    sidecar: SidecarResources = SidecarResources()
    parameters: dict[str, ParamRange] = Field(min_length=1)
    objectives: list[Annotated[Objective, BeforeValidator(_objective)]] = Field(
        default_factory=lambda: [Objective(metric="latency_p95_ms"), Objective(metric="cpu_cores")],
        min_length=1,
    )
    constraints: Constraints = Constraints()
    load: LoadSpec = LoadSpec()
    timing: Timing = Timing()
    measurement: MeasurementSpec = MeasurementSpec()
    target: TargetSpec = LocalTargetSpec()
    #: Set by the loader: the file this spec came from (for relative paths and messages).
    source: str = Field(default="<memory>", exclude=True)

    def search_space(self) -> list[SearchParam]:
        """The validated parameters, in spec order (CPU values in cores)."""
        return [_search_param(name, r) for name, r in self.parameters.items()]

    def locustfile_path(self) -> Path:
        """The locustfile to run: the spec's (relative to the spec file) or the built-in paced one."""
        if self.load.locustfile:
            p = Path(self.load.locustfile)
            return p if p.is_absolute() else Path(self.source).parent / p
        return Path(__file__).parents[1] / "load" / "locustfile.py"

    def with_overrides(self, **changes: Any) -> StudySpec:
        """A copy with dotted-path overrides, e.g. ``{"study.trials": 3, "load.duration": 5}``,
        validated like the file itself."""
        data = self.model_dump(by_alias=False, exclude={"source"})
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return parse_spec(data, self.source)


def _search_param(name: str, r: ParamRange) -> SearchParam:
    info = PARAMETERS[name]
    if info.kind == "cpu":
        low, high = parse_cpu(r.low), parse_cpu(r.high)
        step = parse_cpu(r.step) if r.step is not None else None
    else:
        low, high = float(r.low), float(r.high)
        step = float(r.step) if r.step is not None else None
    return SearchParam(name=name, info=info, low=low, high=high, log=r.log, step=step)


def _check_param(name: str, r: ParamRange) -> list[str]:
    """Istio's and Optuna's rules for one range; each problem names the field path and the rule."""
    where = f'parameters["{name}"]'
    info = PARAMETERS.get(name)
    if info is None:
        known = ", ".join(PARAMETERS)
        return [f"{where}: unknown parameter; known parameters are {known}"]
    if r.type is not None and r.type != info.kind:
        return [f"{where}.type: {name} is of type {info.kind!r}, not {r.type!r}"]
    problems: list[str] = []
    values: dict[str, float] = {}
    for key in ("low", "high", "step"):
        raw = getattr(r, key)
        if raw is None:
            continue
        try:
            if info.kind == "cpu":
                values[key] = parse_cpu(raw)
            else:
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise ValueError(f"must be a whole number, got {raw!r}")
                values[key] = float(raw)
        except ValueError as exc:
            problems.append(f"{where}.{key}: {exc}")
    if problems:
        return problems
    low, high = values["low"], values["high"]
    if low < info.minimum:
        why = ("Istio treats 0 as unset and istiod rejects negative limits"
               if info.kind == "int" else "the local cgroup quota cannot go below 10m")
        problems.append(f"{where}.low: must be >= {_fmt(info, info.minimum)} ({why}), got {_fmt(info, low)}")
    if high > info.maximum:
        problems.append(f"{where}.high: must be <= {_fmt(info, info.maximum)}, got {_fmt(info, high)}")
    if low > high:
        problems.append(f"{where}: low <= high must hold, got low={_fmt(info, low)}, high={_fmt(info, high)}")
    if r.log and "step" in values:
        problems.append(f"{where}: log and step cannot be combined (Optuna samples one or the other)")
    if "step" in values and values["step"] <= 0:
        problems.append(f"{where}.step: must be > 0")
    return problems


def _fmt(info: ParamInfo, value: float) -> str:
    return format_cpu(value) if info.kind == "cpu" else str(int(value))


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in part:
            out += f'["{part}"]'
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def parse_spec(data: Any, source: str = "<memory>") -> StudySpec:
    """Validate an already-loaded document; raise ``SpecError`` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): a study spec is a mapping with at least 'study' and 'parameters'"])
    problems: list[str] = []
    spec: StudySpec | None = None
    try:
        spec = StudySpec.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems += [f"{_format_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
    raw_params = data.get("parameters")
    if isinstance(raw_params, dict):
        for name, raw in raw_params.items():
            try:
                r = ParamRange.model_validate(raw)
            except ValidationError:
                continue  # already reported by the model above
            problems += _check_param(str(name), r)
    if problems or spec is None:
        raise SpecError(source, problems)
    return spec
