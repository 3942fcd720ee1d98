"""Side by side on every scenario: Istio's default, two published hand-tuned profiles and a
study's confirmed configs.

    python bench/scenarios.py [--spec search-spaces/local-scenarios.yaml] [--study NAME]
                              [--storage URL] [--rounds 3] [--window 5] [--windows 2]
                              [--set label:KEY=VALUE,KEY=VALUE ...] [--no-write]

Each round measures every config once on every scenario of the spec (in the spec's order, the
configs in a rotated order from round to round so none always runs first), on one local target,
early abort off. Per config and scenario it prints the median over the rounds of the corrected
p95/p99 of successful requests, goodput within the SLO, the client error rate and the CPU used,
each ratio to Istio's default with a 90 % bootstrap interval over the paired rounds, and then
checks the issue's targets:

- surge: goodput within the SLO at least 2x the default's, p99 at most 1/3 of it;
- failing: client error rate at most 1/5 of the default's, p99 no worse (ratio interval reaching 1);
- steady: p95 inside the default's interval (min..max over its rounds) with a CPU limit at most
  1/4 of the default's (or none), and a CPU request that covers the CPU used.

The study's configs are its confirmed Pareto configs as confirmed (the minimal config: knobs
without a detected effect back at Istio's default). Writes the tables into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd

from _results import write_section
from autotune.mesh import MeshConfig
from autotune.spec import LocalTargetSpec, StudySpec, load_spec
from autotune.study import config_of, confirmation_of, make_storage, measure_config
from autotune.targets.local import LocalTarget

#: The two published hand-tuned profiles of the issue's table.
PROFILES: dict[str, dict[str, int | float | str]] = {
    "hand-tuned latency": {"connectionPool.tcp.maxConnections": 100,
                           "connectionPool.http.http1MaxPendingRequests": 1000,
                           "connectionPool.http.maxRequestsPerConnection": 10,
                           "connectionPool.http.maxRetries": 3, "proxy.concurrency": 2,
                           "proxy.cpuLimit": 0.5},
    "hand-tuned throughput": {"connectionPool.tcp.maxConnections": 1000,
                              "connectionPool.http.http1MaxPendingRequests": 10000,
                              "connectionPool.http.maxRequestsPerConnection": 100,
                              "connectionPool.http.maxRetries": 5, "proxy.concurrency": 4,
                              "proxy.cpuLimit": 0.5},
}
DEFAULT = "Istio default"
METRICS = ("latency_p95_corrected_ms", "latency_p99_corrected_ms", "goodput_slo_rps", "error_rate",
           "cpu_used_cores")
SHORT = {"latency_p95_corrected_ms": "p95", "latency_p99_corrected_ms": "p99",
         "goodput_slo_rps": "goodput in SLO", "error_rate": "errors", "cpu_used_cores": "CPU used"}


@dataclass(frozen=True)
class Candidate:
    """A config measured by the bench, with the label it is shown under."""

    label: str
    config: MeshConfig


def study_configs(study_name: str, storage: str) -> list[Candidate]:
    """The confirmed configs of ``study_name``, as the confirmation measured them (the knobs it
    reset left out). Exits with a message when the study has no confirmed config."""
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    confirmation = confirmation_of(study)
    if confirmation is None or not any(c.confirmed for c in confirmation.results.values()):
        raise SystemExit(f"study {study_name} has no confirmed config; pass --set label:KEY=VALUE,…")
    out = []
    for c in confirmation.results.values():
        if not c.confirmed:
            continue
        params = {k: v for k, v in config_of(study.trials[c.trial]).to_params().items() if k not in c.reset}
        out.append(Candidate(f"study trial {c.trial}", MeshConfig.from_params(params)))
    return out


def parse_set(raw: str) -> Candidate:
    """``label:KEY=VALUE,KEY=VALUE`` as a candidate."""
    label, _, body = raw.partition(":")
    params: dict[str, float | str] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            params[key] = float(value)
        except ValueError:
            params[key] = value
    return Candidate(label, MeshConfig.from_params(params))


def measure(spec: StudySpec, candidates: Sequence[Candidate], rounds: int) -> pd.DataFrame:
    """One row per (round, config, scenario, metric) with the measured value."""
    assert isinstance(spec.target, LocalTargetSpec)
    rows = []
    with LocalTarget(spec.target, spec.service, timing=spec.timing) as target:
        for r in range(rounds):
            order = list(candidates[r % len(candidates):]) + list(candidates[:r % len(candidates)])
            for cand in order:
                m = measure_config(target, spec, cand.config, early_abort=False)
                for scenario in spec.scenario_list():
                    for metric in METRICS:
                        value = m.metrics.get(f"{scenario.name}.{metric}", np.nan)
                        rows.append({"round": r, "config": cand.label, "scenario": scenario.name,
                                     "metric": metric, "value": float(value)})
                print(f"round {r + 1}/{rounds} {cand.label}: " + ", ".join(
                    f"{s.name} p99 {m.metrics.get(s.name + '.latency_p99_corrected_ms', np.nan):.0f} ms "
                    f"errors {m.metrics.get(s.name + '.error_rate', np.nan):.1%}"
                    for s in spec.scenario_list()), flush=True)
            target.restore()
    return pd.DataFrame(rows)


def ratio_interval(values: np.ndarray, base: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Median ratio of paired rounds and a 90 % bootstrap interval of the ratio of medians."""
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(np.median(values) / np.median(base)) if np.median(base) else np.inf
        idx = rng.integers(0, len(values), size=(2000, len(values)))
        boot = np.median(values[idx], axis=1) / np.median(base[idx], axis=1)
    boot = boot[np.isfinite(boot)] if np.isfinite(boot).any() else boot
    return point, float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))


def summary(frame: pd.DataFrame, candidates: Sequence[Candidate], spec: StudySpec) -> pd.DataFrame:
    """Per scenario and config: the median of each metric and its ratio to the default [90 % CI]."""
    out = []
    for scenario in spec.scenario_list():
        for cand in candidates:
            row: dict[str, object] = {"scenario": scenario.name, "config": cand.label}
            for metric in METRICS:
                sel = frame[(frame.scenario == scenario.name) & (frame.metric == metric)]
                vals = sel[sel.config == cand.label].sort_values("round").value.to_numpy()
                base = sel[sel.config == DEFAULT].sort_values("round").value.to_numpy()
                med = float(np.median(vals))
                cell = f"{med:.1%}" if metric == "error_rate" else f"{med:.3g}"
                if cand.label != DEFAULT and len(vals) and np.median(base) > 0:
                    point, lo, hi = ratio_interval(vals, base)
                    cell += f" ({point:.2f}x [{lo:.2f}, {hi:.2f}])"
                row[SHORT[metric]] = cell
            limit = cand.config.limit_cores
            row["CPU limit"] = "none" if limit is None else f"{limit * 1000:.0f}m"
            out.append(row)
    return pd.DataFrame(out)


def verdicts(frame: pd.DataFrame, candidates: Sequence[Candidate], spec: StudySpec) -> pd.DataFrame:
    """The issue's targets for each non-default config, met or not, with the numbers."""
    def med(label: str, scenario: str, metric: str) -> float:
        sel = frame[(frame.config == label) & (frame.scenario == scenario) & (frame.metric == metric)]
        return float(np.median(sel.value)) if len(sel) else np.nan

    def values(label: str, scenario: str, metric: str) -> np.ndarray:
        sel = frame[(frame.config == label) & (frame.scenario == scenario) & (frame.metric == metric)]
        return sel.sort_values("round").value.to_numpy()

    names = {s.name for s in spec.scenario_list()}
    default_limit = MeshConfig().limit_cores
    sidecar_request = spec.sidecar.cpu_request_cores
    rows = []
    for cand in candidates:
        if cand.label == DEFAULT:
            continue
        checks: list[tuple[str, bool, str]] = []
        if "surge" in names:
            got, base_g = med(cand.label, "surge", "goodput_slo_rps"), med(DEFAULT, "surge", "goodput_slo_rps")
            g = got / base_g if base_g > 0 else (np.inf if got > 0 else 1.0)
            g_text = f"{g:.2f}x" if base_g > 0 else f"{got:.0f}/s vs none within the SLO"
            p = (med(cand.label, "surge", "latency_p99_corrected_ms")
                 / med(DEFAULT, "surge", "latency_p99_corrected_ms"))
            checks += [("surge goodput in SLO >= 2x", g >= 2, g_text),
                       ("surge p99 <= 1/3", p <= 1 / 3, f"{p:.2f}x")]
        if "failing" in names:
            e = med(cand.label, "failing", "error_rate") / max(med(DEFAULT, "failing", "error_rate"), 1e-9)
            _, lo, _ = ratio_interval(values(cand.label, "failing", "latency_p99_corrected_ms"),
                                      values(DEFAULT, "failing", "latency_p99_corrected_ms"))
            p99 = "latency_p99_corrected_ms"
            p = med(cand.label, "failing", p99) / med(DEFAULT, "failing", p99)
            checks += [("failing errors <= 1/5", e <= 0.2, f"{e:.2f}x"),
                       ("failing p99 no worse", lo <= 1.0, f"{p:.2f}x (CI low {lo:.2f})")]
        if "steady" in names:
            base = values(DEFAULT, "steady", "latency_p95_corrected_ms")
            p95 = med(cand.label, "steady", "latency_p95_corrected_ms")
            limit = cand.config.limit_cores
            used = med(cand.label, "steady", "cpu_used_cores")
            request = cand.config.request_cores(sidecar_request)
            checks += [("steady p95 in default's range", base.min() <= p95 <= base.max() or p95 <= base.min(),
                        f"{p95:.1f} ms vs [{base.min():.1f}, {base.max():.1f}]"),
                       ("steady CPU limit <= 1/4 (or none)",
                        limit is None or (default_limit is not None and limit <= default_limit / 4),
                        "none" if limit is None else f"{limit * 1000:.0f}m"),
                       ("CPU request covers use", request >= used,
                        f"request {request * 1000:.0f}m vs used {used * 1000:.0f}m")]
        for name, ok, detail in checks:
            rows.append({"config": cand.label, "target": name, "met": "yes" if ok else "NO", "measured": detail})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-scenarios.yaml")
    parser.add_argument("--study", help="add this study's confirmed configs (default: the spec's study)")
    parser.add_argument("--no-study", action="store_true", help="only the default, profiles and --set")
    parser.add_argument("--storage", help="default: the spec's storage")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="LABEL:KEY=VALUE,…")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window (every scenario)")
    parser.add_argument("--windows", type=int, default=2, help="windows per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per scenario")
    parser.add_argument("--no-profiles", action="store_true", help="leave out the two hand-tuned profiles")
    parser.add_argument("--title", default="Scenarios: the default, hand-tuned profiles and the study's configs",
                        help="the RESULTS.md section to (re)write")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    scenarios = [{**s.model_dump(by_alias=False), "window": args.window, "windows": args.windows,
                  "warmup": args.warmup} for s in spec.scenarios]
    spec = spec.with_overrides(scenarios=scenarios)
    candidates = [Candidate(DEFAULT, MeshConfig())]
    if not args.no_profiles:
        candidates += [Candidate(k, MeshConfig.from_params(dict(v))) for k, v in PROFILES.items()]
    if not args.no_study:
        candidates += study_configs(args.study or spec.study.name, args.storage or spec.study.storage)
    candidates += [parse_set(s) for s in args.sets]
    per_config = sum(s.warmup + s.window * (s.windows or 1) + 3 for s in spec.scenario_list())
    print(f"{len(candidates)} configs x {args.rounds} rounds x {len(spec.scenario_list())} scenarios: "
          f"about {len(candidates) * args.rounds * per_config / 60:.0f} min of load")
    for c in candidates:
        print(f"  {c.label}: {c.config.describe()}")
    frame = measure(spec, candidates, args.rounds)
    table = summary(frame, candidates, spec).to_markdown(index=False)
    checks = verdicts(frame, candidates, spec).to_markdown(index=False)
    print(table)
    print(checks)
    if not args.no_write:
        configs = "\n".join(f"- {c.label}: {c.config.describe()}" for c in candidates)
        write_section(args.title, f"""
Spec {args.spec}; every scenario {args.warmup:g} s warm-up + {args.windows} × {args.window:g} s windows,
{args.rounds} interleaved rounds (rotated order), early abort off. Cells: median over rounds (ratio
to Istio's default [90 % bootstrap interval over rounds]). Latency is the corrected p95/p99 of
successful requests (from each request's scheduled start).

{configs}

{table}

Targets of issue 11:

{checks}
""")


if __name__ == "__main__":
    main()
