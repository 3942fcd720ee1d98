"""Exports of a study: ``trials.csv``, ``pareto.csv``, ready-to-apply manifests, and the report
(``report.md``/``report.html``/``pareto.html``, see ``_report``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from autotune.errors import ExportError
from autotune.export._effects import minimal_manifests
from autotune.export._report import write_report
from autotune.export._retune import retune_section, write_outcome
from autotune.mesh import PARAMETERS, format_cpu
from autotune.spec import StudySpec
from autotune.study import (
    MANIFESTS,
    TrialRecord,
    baseline_trial,
    confirmation_of,
    knob_effects_of,
    minimal_config,
    pareto_trials,
    study_objectives,
    study_spec,
)

#: The first scenario's metrics (a spec without scenarios has only ``steady``), unprefixed.
METRIC_COLUMNS = [
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cpu_cores", "cpu_reserved_cores",
    "cpu_used_cores", "cpu_requested_cores", "cpu_limit_cores", "cpu_per_1k_rps",
    "cpu_throttled_ratio", "achieved_rps", "offered_rps", "throughput_ratio", "error_rate",
    "requests", "latency_p50_corrected_ms", "latency_p95_corrected_ms", "latency_p99_corrected_ms",
    "goodput_rps", "goodput_slo_rps",
]
#: With several scenarios, each one's metrics as ``<scenario>.<metric>`` (then the proxy's own
#: counters, ``ProxyUsage.extra``, alphabetically).
SCENARIO_COLUMNS = [
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_p50_corrected_ms",
    "latency_p95_corrected_ms", "latency_p99_corrected_ms", "goodput_rps", "goodput_slo_rps",
    "achieved_rps", "throughput_ratio", "error_rate", "cpu_used_cores", "cpu_per_1k_rps",
    "cpu_throttled_ratio", "requests",
]
#: Per-window bookkeeping, not a scenario's result.
_NOT_COLUMNS = frozenset({"window_s", "failures", "offered_rps", "cpu_throttled_s", "cpu_cores",
                          "cpu_reserved_cores", "cpu_requested_cores", "cpu_limit_cores"})


def study_scenarios(study: optuna.Study) -> list[str]:
    """The names of the study's scenarios, in order, from its stored spec (``[]`` without any:
    one ``steady``)."""
    raw = study_spec(study).get("scenarios")
    return [str(s["name"]) for s in raw if isinstance(s, dict) and "name" in s] if isinstance(raw, list) else []


def results_dir(spec: StudySpec) -> Path:
    """Where the spec's study exports: ``<results_dir>/<study name>``."""
    return Path(spec.study.results_dir) / spec.study.name


def trial_row(trial: FrozenTrial, scenarios: Sequence[str] = ()) -> dict[str, object]:
    """One trial as a flat row: number, state, baseline, config by Istio name, metrics (with
    two or more ``scenarios``, each one's as ``<scenario>.<metric>``), early abort, reason."""
    rec = TrialRecord.read(trial)
    config = rec.config
    row: dict[str, object] = {
        "trial": trial.number,
        "state": trial.state.name,
        "baseline": rec.baseline,
        "feasible": rec.feasible,
        "config": config.describe(),
    }
    set_values = config.to_params()
    for name, info in PARAMETERS.items():
        value = set_values.get(name)
        row[name] = (format_cpu(value) if info.kind == "cpu" and not isinstance(value, str) else value) \
            if value is not None else None
    row["envoy_concurrency"] = config.effective_concurrency
    for col in METRIC_COLUMNS:
        row[col] = _number(rec.metrics.get(col))
    for col in sorted(k for k in rec.metrics if k.startswith("envoy_")):  # the proxy's own counters
        row[col] = _number(rec.metrics.get(col))
    if len(scenarios) > 1:
        row.update(_scenario_columns(rec.metrics, scenarios))
    row["latency_p95_cv"] = rec.spread_cv.get("latency_p95_ms")
    row["cpu_cores_cv"] = rec.spread_cv.get("cpu_cores")
    row["windows"] = len(rec.windows) or None
    row["drift_pct"] = rec.drift_pct
    row["trial_wall_s"] = rec.timings.get("total_s")
    aborted = rec.aborted_after or {}
    row["aborted_after"] = f"{aborted['scenario']} window {aborted['window']}" if aborted else None
    row["abort_saved_s"] = aborted.get("saved_s")
    row["violations"] = "; ".join(rec.violations)
    row["fail_reason"] = rec.fail_message or (rec.fail_reason.value if rec.fail_reason else None)
    return row


def _scenario_columns(metrics: dict[str, float], scenarios: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in scenarios:
        extra = sorted(k.partition(".")[2] for k in metrics if k.partition(".")[0] == name
                       and k.partition(".")[2] not in SCENARIO_COLUMNS
                       and k.partition(".")[2] not in _NOT_COLUMNS)
        for col in [*SCENARIO_COLUMNS, *extra]:
            out[f"{name}.{col}"] = _number(metrics.get(f"{name}.{col}"))
    return out


def _number(value: float | None) -> float | None:
    """A metric for a table: ``None`` when it was never measured or is not a number."""
    return None if value is None or math.isnan(value) else value


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial of the study (any state except WAITING), in trial order."""
    scenarios = study_scenarios(study)
    rows = [trial_row(t, scenarios) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    return pd.DataFrame(rows)


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto front with, per objective, the change against the nearest baseline
    in %, and, once confirmation ran, whether each config is confirmed with the interval of
    each objective's change (``<metric>_ci_low_pct`` … ``_ci_high_pct``). ``minimal_config`` is
    the config the manifests write (knobs with no detected effect back to Istio's default,
    listed in ``reset_to_default``); the metrics are the trial's, measured as searched."""
    metrics = study_objectives(study) or []
    effects = knob_effects_of(study)
    confirmation = confirmation_of(study)
    confirmed = confirmation.results if confirmation else {}
    rows = []
    scenarios = study_scenarios(study)
    for t in pareto_trials(study):
        row = trial_row(t, scenarios)
        base = baseline_trial(study, near=t.number)
        row["compared_with_baseline"] = base.number if base else None
        base_metrics = TrialRecord.read(base).metrics if base else {}
        own = TrialRecord.read(t).metrics
        for metric in metrics:
            b, v = _number(base_metrics.get(metric)), _number(own.get(metric))
            row[f"{metric}_vs_baseline_pct"] = (
                round(100.0 * (v - b) / b, 1) if b and v is not None else None
            )
        entry = confirmed.get(t.number)
        row["confirmed"] = None if entry is None else entry.confirmed
        for metric in metrics:
            change = entry.changes.get(metric) if entry else None
            row[f"{metric}_confirmed_change_pct"] = change.mean_pct if change else None
            row[f"{metric}_ci_low_pct"] = change.low_pct if change else None
            row[f"{metric}_ci_high_pct"] = change.high_pct if change else None
        row["confirmation_note"] = entry.reason if entry else None
        minimal, reset = minimal_config(TrialRecord.read(t).config, effects)
        row["minimal_config"] = minimal.describe()
        row["reset_to_default"] = ", ".join(reset) or None
        rows.append(row)
    return pd.DataFrame(rows)


def front_with_baseline(study: optuna.Study) -> pd.DataFrame:
    """``pareto_frame`` plus, when the first baseline is not on the front, its row below the front
    for reference (what the terminal table shows). Empty when no trial is feasible."""
    frame = pareto_frame(study)
    base = baseline_trial(study, first=True)
    if frame.empty or base is None or frame["baseline"].any():
        return frame
    return pd.concat([frame, pd.DataFrame([trial_row(base, study_scenarios(study))])], ignore_index=True)


@dataclass(frozen=True)
class Exported:
    """What ``export_study`` wrote."""

    directory: Path
    trials_csv: Path
    pareto_csv: Path
    manifest_dirs: list[Path]


def export_study(study: optuna.Study, out_dir: Path) -> Exported:
    """Write ``trials.csv``, ``pareto.csv``, ``pareto.html`` and, for each Pareto trial,
    ``trial-<n>/{destinationrule,deployment-patch}.yaml`` (and ``virtualservice.yaml`` when a
    route setting is tuned) under ``out_dir``; for a scheduled run also ``outcome.json`` and the
    recommendation's manifests in ``recommended/``. Overwrites. The manifests are the trial's minimal
    config: the knobs with no detected effect (the study's stored verdicts) are left out, so
    Istio's defaults apply to them; without verdicts, the config as searched.
    A folder or file that cannot be written raises ``ExportError`` naming it."""
    try:
        return _export(study, out_dir)
    except OSError as exc:
        where = exc.filename or out_dir
        raise ExportError(f"could not write the results to {where}: {exc.strerror or exc}") from exc


def _export(study: optuna.Study, out_dir: Path) -> Exported:
    out_dir.mkdir(parents=True, exist_ok=True)
    trials_csv, pareto_csv = out_dir / "trials.csv", out_dir / "pareto.csv"
    trials_frame(study).to_csv(trials_csv, index=False)
    pareto_frame(study).to_csv(pareto_csv, index=False)
    dirs = []
    effects, spec = knob_effects_of(study), study_spec(study)
    for t in pareto_trials(study):
        d = out_dir / f"trial-{t.number:03d}"
        d.mkdir(exist_ok=True)
        record = TrialRecord.read(t)
        manifests = minimal_manifests(record, *minimal_config(record.config, effects), spec)
        for name in MANIFESTS:
            if name in manifests:  # virtualservice.yaml only when a route setting is tuned
                (d / name).write_text(manifests[name], encoding="utf-8")
            else:  # an earlier export's, of a config that tuned it
                (d / name).unlink(missing_ok=True)
        dirs.append(d)
    # report.md, report.html, pareto.html; the report is also the study's note in the dashboard.
    write_report(study, out_dir, trials_frame(study), pareto_frame(study), front_with_baseline(study),
                 objectives=study_objectives(study) or [], spec=spec,
                 confirmation=confirmation_of(study), effects=effects, extra=retune_section(study))
    write_outcome(study, out_dir)  # a scheduled run's outcome.json and recommended/ manifests
    return Exported(out_dir, trials_csv, pareto_csv, dirs)
