"""A recorded scenario landscape: per config, per scenario, what the study measures, replayed.

``bench/record_landscape.py --scenarios`` measures a design of configs on the local target under
every scenario of a spec and writes one CSV row per config: the parameters by Istio name (a blank
cell is a setting left out, at Istio's default; ``proxy.cpuLimit`` may be ``unset``), then for each
scenario ``<scenario>.<metric>`` (the metrics of ``measure_config``) and ``<scenario>.cv_<metric>``
(their coefficient of variation over the recorded windows), and ``fail`` (the ``FailReason`` of a
config whose measurement failed). :class:`ScenarioGrid` reads it against the spec it was recorded
with; :meth:`ScenarioGrid.landscape` turns it into a :class:`~autotune.testing.replay.Landscape`
that the replay target and driver share::

    grid = ScenarioGrid.read("bench/landscape-scenarios.csv", spec)
    land = grid.landscape(seed=3)
    run_study(spec, target=ReplayTarget(land), load=ReplayDriver(land))

A config is answered by its nearest recorded config over the spec's search space: each numeric
parameter scaled to [0, 1] over its range (in log space where the parameter is ``log``), each
categorical one (``loadBalancer.simple``; a ``proxy.cpuLimit`` left ``unset``) adding 1 when it
differs. The scenario is recognised from the load run's load and the service faults in force, as
``measure_config`` sets them. Each window varies by the recorded window spread (seeded, see
``Landscape``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from autotune.errors import FailReason
from autotune.mesh import ISTIO_UNSET_LIMIT, NO_LIMIT, MeshConfig, ParamValue
from autotune.spec import EndpointFault, LoadSpec, SearchParam, StudySpec
from autotune.testing.replay import Landscape, Point, Spread

#: What a left-out setting counts as (Istio's or Envoy's default), where that is not the top of
#: its range; concurrency and the CPU limit come from the config itself.
LEFT_OUT: dict[str, ParamValue] = {
    "loadBalancer.simple": "LEAST_REQUEST",
    "outlierDetection.consecutive5xxErrors": 0,  # no outlier detection: never ejects, like 0
    "outlierDetection.consecutiveGatewayErrors": 0,
    "outlierDetection.interval": 10_000,
    "outlierDetection.baseEjectionTime": 30_000,
    "outlierDetection.maxEjectionPercent": 10,
    "connectionPool.tcp.connectTimeout": 10_000,
    "retries.attempts": 2,
}
#: Spread columns (``<scenario>.cv_<metric>``) and the part of a point's noise each one drives.
SPREAD_COLUMNS = {
    "latency_p95_ms": "latency",
    "latency_p95_corrected_ms": "latency_corrected",
    "error_rate": "error_rate",
    "throughput_ratio": "throughput_ratio",
    "cpu_used_cores": "cpu_cores",
    "goodput_slo_rps": "slo_share",
}


class ScenarioGrid:
    """The rows of a scenario landscape CSV, looked up by nearest recorded config (see the module
    docstring). ``configs[i]`` and ``metrics[i]`` are row ``i``'s config and its recorded
    metrics (``<scenario>.<metric>``, NaN where not measured); ``fails[i]`` its failure."""

    def __init__(self, rows: Sequence[dict[str, str]], spec: StudySpec) -> None:
        if not rows:
            raise ValueError("the scenario landscape has no rows")
        self.space = spec.search_space()
        self.scenarios = spec.scenario_list()
        self.request_default = spec.sidecar.cpu_request_cores
        header = rows[0].keys()
        missing = [p.name for p in self.space if p.name not in header]
        missing += [f"{s.name}.latency_p95_ms" for s in self.scenarios if f"{s.name}.latency_p95_ms" not in header]
        if missing:
            raise ValueError(f"the scenario landscape lacks the columns {missing} of the spec {spec.source}")
        names = {p.name for p in self.space}
        self.configs = [MeshConfig.from_params({k: _param(v) for k, v in r.items() if k in names and v})
                        for r in rows]
        self.metrics = [{k: _float(v) for k, v in r.items() if "." in k and k.split(".", 1)[0] in
                         {s.name for s in self.scenarios}} for r in rows]
        self.fails = [FailReason(r["fail"]) if r.get("fail") else None for r in rows]
        self._coords = [self.coordinates(c) for c in self.configs]
        self._nearest: dict[MeshConfig, int] = {}

    @classmethod
    def read(cls, path: Path | str, spec: StudySpec) -> ScenarioGrid:
        """The CSV at ``path``, recorded with ``spec``'s search space and scenarios."""
        with open(path, newline="", encoding="utf-8") as f:
            return cls(list(csv.DictReader(f)), spec)

    def coordinates(self, config: MeshConfig) -> tuple[list[float], list[str]]:
        """``config`` as numbers in [0, 1] (one per numeric parameter) and categories."""
        params = config.to_params()
        numbers: list[float] = []
        categories: list[str] = []
        for p in self.space:
            if p.info.kind == "choice":
                categories.append(str(params.get(p.name, LEFT_OUT.get(p.name, p.choices[0]))))
                continue
            if p.name == "proxy.cpuLimit":
                categories.append("unset" if config.no_cpu_limit else "limit")
                value: float = config.effective_cpu_limit
            elif p.name == "proxy.concurrency":
                value = float(config.effective_concurrency)
            elif p.name == "proxy.cpuRequest":
                value = config.request_cores(self.request_default)
            else:
                raw = params.get(p.name, LEFT_OUT.get(p.name, ISTIO_UNSET_LIMIT))
                value = float(raw)
            numbers.append(_scaled(value, p))
        return numbers, categories

    def nearest(self, config: MeshConfig) -> int:
        """The index of the recorded config nearest to ``config`` (the first of equals)."""
        if config not in self._nearest:
            numbers, categories = self.coordinates(config)

            def distance(i: int) -> float:
                nums, cats = self._coords[i]
                return (sum((a - b) ** 2 for a, b in zip(numbers, nums, strict=True))
                        + sum(a != b for a, b in zip(categories, cats, strict=True)))

            self._nearest[config] = min(range(len(self.configs)), key=distance)
        return self._nearest[config]

    def scenario_of(self, load: LoadSpec, faults: Sequence[EndpointFault]) -> str:
        """The name of the spec's (first) scenario with this load and these service faults."""
        for s in self.scenarios:
            if s.load == load and s.faults == tuple(faults):
                return s.name
        raise ValueError(f"no scenario of the landscape runs {load.offered_rps:g} rps with faults "
                         f"{list(faults)} (scenarios: {', '.join(s.name for s in self.scenarios)})")

    def point(self, config: MeshConfig, scenario: str, *, noise: bool = True) -> Point:
        """What ``config`` measures under ``scenario``: its nearest recorded config's figures."""
        i = self.nearest(config)
        m = self.metrics[i]
        s = next(x for x in self.scenarios if x.name == scenario)

        def get(name: str, default: float = math.nan) -> float:
            value = m.get(f"{scenario}.{name}", math.nan)
            return value if math.isfinite(value) else default

        def cv(name: str) -> float:
            return get(f"cv_{name}", 0.0) if noise else 0.0

        goodput = get("goodput_rps", 0.0)
        p95 = get("latency_p95_ms")
        fail = self.fails[i] or (None if math.isfinite(p95) else FailReason.NO_SUCCESS)
        return Point(
            latency_p50_ms=get("latency_p50_ms"), latency_p95_ms=p95, latency_p99_ms=get("latency_p99_ms"),
            cpu_cores=get("cpu_used_cores", 0.0), error_rate=get("error_rate", 1.0),
            throughput_ratio=get("throughput_ratio", 0.0), noise_cv=cv("latency_p95_ms"), fail=fail,
            latency_p50_corrected_ms=get("latency_p50_corrected_ms"),
            latency_p95_corrected_ms=get("latency_p95_corrected_ms"),
            latency_p99_corrected_ms=get("latency_p99_corrected_ms"),
            slo_ms=s.slo_ms, slo_share=get("goodput_slo_rps", 0.0) / goodput if goodput > 0 else 0.0,
            spread=Spread(**{field: cv(column) for column, field in SPREAD_COLUMNS.items() if field != "latency"}),
        )

    def landscape(self, *, seed: int = 0, noise: bool = True) -> Landscape:
        """A replay landscape answering each load run with the scenario it recognises (see
        ``scenario_of``); outside a load run, the first scenario's point."""
        first = self.scenarios[0].name
        return Landscape.synthetic(
            lambda config: self.point(config, first, noise=noise), seed=seed,
            conditions=lambda config, _point, load, faults: self.point(
                config, self.scenario_of(load, faults), noise=noise))


def _scaled(value: float, p: SearchParam) -> float:
    """``value`` as a position in ``p``'s range, clamped to [0, 1] (log where ``p.log``)."""
    low, high = p.low, p.high
    if high <= low:
        return 0.0
    value = min(max(value, low), high)
    if p.log and low > 0:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def _param(raw: str) -> ParamValue:
    if raw == NO_LIMIT:
        return raw
    try:
        return float(raw)
    except ValueError:
        return raw  # a category


def _float(raw: str | None) -> float:
    try:
        return float(raw) if raw not in (None, "") else math.nan
    except ValueError:
        return math.nan


__all__ = ["LEFT_OUT", "SPREAD_COLUMNS", "ScenarioGrid"]
