"""Exports of a study: ``trials.csv``, ``pareto.csv``, ``pareto.html`` and ready-to-apply manifests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from autotune.mesh import PARAMETERS, MeshConfig, format_cpu
from autotune.spec import StudySpec
from autotune.study import baseline_trial, pareto_trials

METRIC_COLUMNS = [
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cpu_cores", "cpu_reserved_cores",
    "cpu_throttled_ratio", "achieved_rps", "offered_rps", "throughput_ratio", "error_rate",
    "requests",
]
MANIFESTS = ("destinationrule.yaml", "deployment-patch.yaml")


def results_dir(spec: StudySpec) -> Path:
    """Where the spec's study exports: ``<results_dir>/<study name>``."""
    return Path(spec.study.results_dir) / spec.study.name


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as a flat row: number, state, baseline, config by Istio name, metrics, reason."""
    ua = trial.user_attrs
    config = MeshConfig.from_params(ua.get("config", trial.params))
    row: dict[str, Any] = {
        "trial": trial.number,
        "state": trial.state.name,
        "baseline": bool(ua.get("baseline", False)),
        "feasible": bool(ua.get("feasible", False)),
        "config": config.describe(),
    }
    set_values = config.to_params()
    for name, info in PARAMETERS.items():
        value = set_values.get(name)
        row[name] = (format_cpu(value) if info.kind == "cpu" else value) if value is not None else None
    row["envoy_concurrency"] = config.effective_concurrency
    for col in METRIC_COLUMNS:
        row[col] = ua.get(col)
    spread = ua.get("spread_cv") or {}
    row["latency_p95_cv"] = spread.get("latency_p95_ms")
    row["cpu_cores_cv"] = spread.get("cpu_cores")
    row["windows"] = ua.get("windows") and len(ua["windows"])
    row["drift_pct"] = ua.get("drift_pct")
    timings = ua.get("timings") or {}
    row["trial_wall_s"] = timings.get("total_s")
    row["violations"] = "; ".join(ua.get("violations") or [])
    row["fail_reason"] = ua.get("fail_message") or ua.get("fail_reason")
    return row


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial of the study (any state except WAITING), in trial order."""
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    return pd.DataFrame(rows)


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto front with, per objective, the change against the nearest baseline
    in %, and, once confirmation ran, whether each config is confirmed with the interval of
    each objective's change (``<metric>_ci_low_pct`` … ``_ci_high_pct``)."""
    metrics: list[str] = study.user_attrs.get("objectives", [])
    confirmation = study.user_attrs.get("confirmation") or {}
    confirmed = confirmation.get("results", {})
    rows = []
    for t in pareto_trials(study):
        row = trial_row(t)
        base = baseline_trial(study, near=t.number)
        row["compared_with_baseline"] = base.number if base else None
        for metric in metrics:
            b = base.user_attrs.get(metric) if base else None
            v = t.user_attrs.get(metric)
            row[f"{metric}_vs_baseline_pct"] = (
                round(100.0 * (v - b) / b, 1) if b and v is not None else None
            )
        entry = confirmed.get(str(t.number))
        row["confirmed"] = None if entry is None else bool(entry["confirmed"])
        for metric in metrics:
            change = (entry or {}).get("changes", {}).get(metric, {})
            row[f"{metric}_confirmed_change_pct"] = change.get("mean_pct")
            row[f"{metric}_ci_low_pct"] = change.get("low_pct")
            row[f"{metric}_ci_high_pct"] = change.get("high_pct")
        row["confirmation_note"] = (entry or {}).get("reason")
        rows.append(row)
    return pd.DataFrame(rows)


def front_with_baseline(study: optuna.Study) -> pd.DataFrame:
    """``pareto_frame`` plus, when the first baseline is not on the front, its row below the front
    for reference (what the terminal table shows). Empty when no trial is feasible."""
    frame = pareto_frame(study)
    base = baseline_trial(study, first=True)
    if frame.empty or base is None or frame["baseline"].any():
        return frame
    return pd.concat([frame, pd.DataFrame([trial_row(base)])], ignore_index=True)


@dataclass(frozen=True)
class Exported:
    """What ``export_study`` wrote."""

    directory: Path
    trials_csv: Path
    pareto_csv: Path
    manifest_dirs: list[Path]


def export_study(study: optuna.Study, out_dir: Path) -> Exported:
    """Write ``trials.csv``, ``pareto.csv``, ``pareto.html`` and, for each Pareto trial,
    ``trial-<n>/{destinationrule,deployment-patch}.yaml`` under ``out_dir``. Overwrites."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials_csv, pareto_csv = out_dir / "trials.csv", out_dir / "pareto.csv"
    trials_frame(study).to_csv(trials_csv, index=False)
    pareto_frame(study).to_csv(pareto_csv, index=False)
    dirs = []
    for t in pareto_trials(study):
        d = out_dir / f"trial-{t.number:03d}"
        d.mkdir(exist_ok=True)
        for name in MANIFESTS:
            (d / name).write_text(t.user_attrs[name], encoding="utf-8")
        dirs.append(d)
    _write_plot(study, out_dir / "pareto.html")
    return Exported(out_dir, trials_csv, pareto_csv, dirs)


def _write_plot(study: optuna.Study, path: Path) -> None:
    """The Pareto front as an interactive plotly page (infeasible trials greyed out)."""
    metrics: list[str] = study.user_attrs.get("objectives", [])
    if len(metrics) not in (2, 3) or (baseline_trial(study) is None and not pareto_trials(study)):
        return
    # Feasibility comes from the constraints each trial set (Trial.set_constraint).
    fig = optuna.visualization.plot_pareto_front(study, target_names=metrics)
    fig.write_html(path, include_plotlyjs="cdn")
