"""A scheduled run's part of the report: what changed since the previous run, and the
recommendation's manifests (``recommended/``) and outcome (``outcome.json``) beside the exports."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import optuna

from autotune.mesh import MeshConfig, ParamValue
from autotune.study import (
    MANIFESTS,
    Interval,
    Outcome,
    metric_name,
    recheck_of,
    run_info,
    run_outcome_of,
    stop_record,
    warm_start_of,
)

#: The folder (under the run's results) holding the recommendation's manifests.
RECOMMENDED_DIR = "recommended"


def _ci(change: Interval | None) -> str:
    if change is None:
        return "-"
    return change.text() if math.isfinite(change.mean_pct) else "-"


def _config(params: Mapping[str, ParamValue] | None) -> str:
    if params is None:
        return "nothing"
    return f"`{MeshConfig.from_params(dict(params)).describe()}`" if params else "Istio's defaults"


def _verdict(outcome: Outcome) -> list[str]:
    rec = outcome.recommendation
    head = {"unchanged": "**Recommendation unchanged**", "changed": "**Recommendation changed**",
            "none-feasible": "**No feasible config**"}[outcome.verdict.value]
    lines = [f"{head} (exit code {outcome.verdict.exit_code}): {_config(rec.params if rec else None)}"
             + (f" from {rec.source}" if rec is not None and rec.source else "") + ".", ""]
    if outcome.previous_recommendation is not None:
        prev = outcome.previous_recommendation
        lines += [f"Previous recommendation: {_config(prev.params)} ({prev.source})."]
    lines += [f"- {r}" for r in outcome.reasons] + [""]
    if outcome.moved:
        lines += ["What moved beyond the noise:", ""] + [f"- {m.text}" for m in outcome.moved] + [""]
    if rec is not None:
        lines += [f"Manifests of the recommendation: `{RECOMMENDED_DIR}/` "
                  f"({', '.join(sorted(outcome.manifests))}).", ""]
    return lines


def _recheck(study: optuna.Study) -> list[str]:
    checked = recheck_of(study)
    if checked is None:
        return []
    metrics = sorted({m for c in checked.configs for m in c.changes} | set(checked.baseline))
    applied = "Istio's defaults (the baseline)" if checked.applied_is_baseline else "see the table"
    lines = ["### Re-check", "",
             f"Measured first, interleaved with Istio's default in {checked.rounds} rounds "
             f"({100 * checked.confidence:.0f} % intervals of the change against the same round's baseline; "
             f"`before` is what {checked.previous or 'the previous run'} measured). Applied on the target: {applied}.",
             ""]
    if not checked.configs:
        return [*lines, "Nothing to re-check: no previous recommendation and the target runs Istio's defaults.", ""]
    lines += ["| config | role | holds | " + " | ".join(f"{metric_name(m)} now [CI] | before" for m in metrics)
              + " | note |", "| :--- | :--- | :--- | " + " | ".join("---: | ---:" for _ in metrics) + " | :--- |"]
    for c in checked.configs:
        holds = "-" if c.holds is None else ("yes" if c.holds else "**no**")
        cells = [f"{_ci(c.changes.get(m))} | {_ci(c.before.get(m))}" for m in metrics]
        lines.append(f"| {_config(c.params)} | {', '.join(c.roles)} | {holds} | " + " | ".join(cells)
                     + f" | {c.reason or ''} |")
    lines.append("")
    if checked.baseline_moves:
        lines += ["| baseline | before | now | change [CI] | moved |", "| :--- | ---: | ---: | ---: | :--- |"]
        lines += [f"| {metric_name(b.metric)} | {b.before:.4g} | {b.now:.4g} | {_ci(b.change)} | "
                  f"{'**yes**' if b.moved else 'no'} |" for b in checked.baseline_moves]
        lines.append("")
    return lines


def _warm(study: optuna.Study) -> list[str]:
    warm = warm_start_of(study)
    if warm is None or warm.previous is None:
        return []
    same = "the same spec" if warm.spec_hash_matched else "a spec that differs (knobs checked one by one)"
    lines = ["### Warm start", "", f"From {warm.previous} ({same}): {len(warm.carried)} config(s) carried and "
             "measured again in this run's first trials, {0} dropped.".format(len(warm.dropped)), ""]
    lines += [f"- carried {c.source}: `{c.describe}`" + (f" (sampled: {', '.join(c.sampled)})" if c.sampled else "")
              for c in warm.carried]
    lines += [f"- dropped {c.source}: `{c.describe}`: {c.reason}" for c in warm.dropped]
    return [*lines, ""]


def _stop(study: optuna.Study) -> list[str]:
    stop = stop_record(study)
    if stop.stopped_after is None:
        return []
    noise = ", ".join(f"{metric_name(m)} ±{100 * v:.1f} %" for m, v in stop.noise.items())
    return ["### Early stop", "", f"Stopped after {stop.stopped_after} trials: the feasible front's hypervolume "
            f"had not grown beyond the measurement noise ({noise}) for {stop.flat} trials "
            f"(measurement.stopAfterFlat = {stop.after_flat}).", ""]


def retune_section(study: optuna.Study) -> list[str]:
    """The report's "What changed" section of a scheduled run (``[]`` for a plain study; a plain
    study that stopped early gets only its "Early stop" note)."""
    info, outcome = run_info(study), run_outcome_of(study)
    if info is None or outcome is None:
        return _stop(study)
    previous = f"previous run {info.previous}" if info.previous else "no previous run"
    lines = ["## What changed", "",
             f"Run {study.study_name} of series {info.series} (autotune {info.version}, spec {info.spec_hash}, "
             f"started {info.started}; {previous}).", ""]
    return lines + _verdict(outcome) + _recheck(study) + _warm(study) + _stop(study)


def write_outcome(study: optuna.Study, out_dir: Path) -> Path | None:
    """Write ``outcome.json`` and the recommendation's manifests (``recommended/``) of a scheduled
    run under ``out_dir``; ``None`` for a plain study."""
    outcome = run_outcome_of(study)
    if outcome is None:
        return None
    path = out_dir / "outcome.json"
    path.write_text(json.dumps(outcome.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    folder = out_dir / RECOMMENDED_DIR
    if outcome.manifests:
        folder.mkdir(exist_ok=True)
        for name in MANIFESTS:
            if name in outcome.manifests:
                (folder / name).write_text(outcome.manifests[name], encoding="utf-8")
    return path
