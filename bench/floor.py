"""Distance to the floor: what the sidecar adds to latency, at Istio's defaults and tuned.

    python bench/floor.py [--spec search-spaces/local-demo.yaml] [--study local-demo] [--rounds 3]

Measures, interleaved in ``--rounds`` rounds with the spec's load and noise control:
  direct:  the load straight to one upstream endpoint (no proxy): the floor;
  default: the Istio-default sidecar (2000m, 2 workers, no connection-pool limits);
  tuned:   the best *confirmed* Pareto config of ``--study`` whose CPU limit is at most the
           default's (lowest p95), or ``--trial N`` of that study, or ``--set KEY=VALUE``.
Prints p50/p95/p99 and the proxy's added p95/p99 over the direct path; writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from _results import write_section
from autotune.export import pareto_frame
from autotune.load import run_load_windows
from autotune.mesh import MeshConfig
from autotune.spec import LocalTargetSpec, StudySpec, load_spec
from autotune.study import aggregate, config_of, make_storage, measure_config
from autotune.targets.local import LocalTarget
from autotune.targets.local._upstream import UpstreamProcess

PCTS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


def tuned_config(study_name: str, storage: str) -> tuple[MeshConfig, str]:
    """The confirmed Pareto config with the lowest p95 among those at or below the default limit."""
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    frame = pareto_frame(study)
    ok = frame[(frame["confirmed"] == True) & (frame["cpu_reserved_cores"] <= 2.0)]  # noqa: E712
    if ok.empty:
        raise SystemExit(f"study {study_name} has no confirmed Pareto config; pass --set instead")
    best = ok.sort_values("latency_p95_ms").iloc[0]
    trial = study.trials[int(best["trial"])]
    return config_of(trial), f"trial {trial.number}: {config_of(trial).describe()}"


def direct(spec: StudySpec, upstream_url: str) -> dict[str, float]:
    """The spec's load straight to the upstream, with the same windows (no proxy, no CPU)."""
    results = run_load_windows(upstream_url, spec.load, spec.locustfile_path(),
                               warmup_s=spec.timing.warmup, window_s=spec.timing.window,
                               windows=spec.measurement.repeats,
                               on_window_start=lambda _i: None, on_window_end=lambda _i: None)
    metrics, _ = aggregate([{k: getattr(r, k) for k in PCTS} for r in results])
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml")
    parser.add_argument("--study", default="local-demo")
    parser.add_argument("--storage", default="sqlite:///trials/autotune.db")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trial", type=int, help="use this trial's config of --study instead")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    assert isinstance(spec.target, LocalTargetSpec)
    if args.trial is not None:
        study = optuna.load_study(study_name=args.study, storage=make_storage(args.storage))
        tuned = config_of(study.trials[args.trial])
        label = f"trial {args.trial} of {args.study}: {tuned.describe()}"
    elif args.sets:
        params = {k: float(v) for k, v in (s.split("=", 1) for s in args.sets)}
        tuned, label = MeshConfig.from_params(params), "--set " + " ".join(args.sets)
    else:
        tuned, label = tuned_config(args.study, args.storage)
    rows: dict[str, list[dict[str, float]]] = {"direct (no proxy)": [], "Istio default": [], "tuned": []}
    with tempfile.TemporaryDirectory() as tmp:
        upstream = UpstreamProcess(spec.target.upstream.service_time_ms, spec.target.upstream.response_bytes,
                                   Path(tmp))
        port = upstream.start()
        try:
            with LocalTarget(spec.target, spec.service) as target:
                for r in range(args.rounds):
                    rows["direct (no proxy)"].append(direct(spec, f"http://127.0.0.1:{port}"))
                    rows["Istio default"].append(measure_config(target, spec, MeshConfig()).metrics)
                    rows["tuned"].append(measure_config(target, spec, tuned).metrics)
                    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                        f"{k} p95 {v[-1]['latency_p95_ms']:.2f} ms" for k, v in rows.items()), flush=True)
        finally:
            upstream.stop()
    med = {k: {m: float(np.median([x[m] for x in v])) for m in PCTS} for k, v in rows.items()}
    floor = med["direct (no proxy)"]
    table = pd.DataFrame([
        {"path": k, "p50 ms": round(v["latency_p50_ms"], 2), "p95 ms": round(v["latency_p95_ms"], 2),
         "p99 ms": round(v["latency_p99_ms"], 2),
         "added p95 ms": round(v["latency_p95_ms"] - floor["latency_p95_ms"], 2),
         "added p99 ms": round(v["latency_p99_ms"] - floor["latency_p99_ms"], 2),
         "CPU limit": "-" if k.startswith("direct") else
         f"{(tuned if k == 'tuned' else MeshConfig()).effective_cpu_limit * 1000:.0f}m"}
        for k, v in med.items()]).to_markdown(index=False)
    print(table)
    write_section("Distance to the floor", f"""
Tuned config: {label}. Upstream service time {spec.target.upstream.service_time_ms:g} ms; load
{spec.load.users} users × {spec.load.per_user_rate:g} rps; medians over {args.rounds} interleaved rounds,
each the median of {spec.measurement.repeats} windows of {spec.timing.window:g} s.

{table}
""")


if __name__ == "__main__":
    main()
