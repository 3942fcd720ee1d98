"""The study report: what a reviewer needs to accept or reject the recommended config.

Built from the same frames as ``trials.csv`` and ``pareto.csv`` (so the numbers match them), it
holds the Pareto table against the baseline, the confirmation intervals, the baseline drift
checks, which knobs mattered (the study's stored verdicts) with the parameter ranges explored
(feasible trials vs the front) and the commands that apply the recommended config. Written as
``report.md`` and ``report.html`` (with the Pareto chart) next to ``trials.csv``, and saved as
the study's note with the chart for optuna-dashboard.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pandas as pd

from autotune.export._effects import knob_effects_section
from autotune.export._table import fmt, label, pareto_text_table, pct, scenario_text_tables
from autotune.mesh import NO_LIMIT, PARAMETERS, format_cpu, parse_cpu
from autotune.study import Confirmation, KnobEffects
from autotune.study import metric_name as _study_metric_name

if TYPE_CHECKING:
    import plotly.graph_objects as go

logger = logging.getLogger(__name__)
#: The id of the Pareto chart saved to the study (saving again replaces it).
PARETO_GRAPH_ID = "autotune-pareto"


def metric_name(metric: str) -> str:
    """The readable name of a metric (``p95 latency (ms)``), or the metric itself."""
    return _study_metric_name(metric)


def _measured(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["state"] == "COMPLETE"] if not trials.empty else trials


def pareto_figure(study_name: str, objectives: Sequence[str], trials: pd.DataFrame,
                  front: pd.DataFrame) -> go.Figure | None:
    """The first two objectives of every measured trial: the feasible front (joined, red),
    other feasible trials (blue), infeasible ones (grey crosses, with why), the first baseline
    (black star) and its drift re-measurements (open stars). ``None`` with fewer than two
    objectives or no measured trial."""
    import plotly.graph_objects as go

    done = _measured(trials)
    if len(objectives) < 2 or done.empty:
        return None
    x, y = objectives[0], objectives[1]
    on_front = set(front["trial"]) if not front.empty else set()
    base = done[done["baseline"].astype(bool)]
    first_base = base["trial"].min() if not base.empty else None
    groups = {
        "feasible Pareto front": done[done["trial"].isin(on_front)].sort_values(x),
        "feasible": done[done["feasible"].astype(bool) & ~done["trial"].isin(on_front)
                         & ~done["baseline"].astype(bool)],
        "infeasible (broke a constraint)": done[~done["feasible"].astype(bool)],
        "baseline (Istio defaults)": base[base["trial"] == first_base],
        "baseline re-measurement (drift check)": base[base["trial"] != first_base],
    }
    style = {
        "feasible Pareto front": dict(mode="lines+markers", marker=dict(color="#d62728", size=11),
                                      line=dict(color="#d62728", dash="dot", shape="hv")),
        "feasible": dict(mode="markers", marker=dict(color="#1f77b4", size=9)),
        "infeasible (broke a constraint)": dict(mode="markers", marker=dict(
            color="#9e9e9e", size=9, symbol="x")),
        "baseline (Istio defaults)": dict(mode="markers", marker=dict(color="black", size=15, symbol="star")),
        "baseline re-measurement (drift check)": dict(mode="markers", marker=dict(
            color="black", size=12, symbol="star-open")),
    }
    fig = go.Figure()
    for name, rows in groups.items():
        if rows.empty:
            continue
        text = [f"trial {r['trial']}: {r['config']}" + (f"<br>{r['violations']}" if isinstance(
            r.get("violations"), str) and r["violations"] else "") for _, r in rows.iterrows()]
        fig.add_trace(go.Scatter(x=rows[x], y=rows[y], name=name, text=text,
                                 hovertemplate="%{text}<br>%{x:.3f}, %{y:.3f}<extra></extra>", **style[name]))
    fig.update_layout(title=f"{study_name}: Pareto front of the feasible trials",
                      xaxis_title=metric_name(x), yaxis_title=metric_name(y),
                      legend=dict(orientation="h", yanchor="top", y=-0.2))
    xs = done[x].dropna()
    if not xs.empty and xs.min() > 0 and xs.max() / xs.min() > 20:  # e.g. a starved config at 300 ms
        fig.update_xaxes(type="log")
    return fig


def _is_word(value: object, kind: str) -> bool:
    """A value shown as itself: a ``choice`` or a CPU limit's ``unset``."""
    return isinstance(value, str) and (kind == "choice" or value == NO_LIMIT)


def _param_values(rows: pd.DataFrame, name: str) -> list[float]:
    kind = PARAMETERS[name].kind
    return [parse_cpu(v) if kind == "cpu" else float(v) for v in rows[name]
            if not pd.isna(v) and not _is_word(v, kind)]


def _span(values: list[float], kind: str, words: list[str] | None = None) -> str:
    counted = [f"{w} ({n})" for w, n in sorted(Counter(words or []).items())]
    if not values:
        return ", ".join(counted) or "-"
    def show(v: float) -> str:
        return format_cpu(v) if kind == "cpu" else f"{v:g}"

    lo, hi = min(values), max(values)
    span = show(lo) if lo == hi else f"{show(lo)} – {show(hi)} ({len(values)})"
    return ", ".join([span, *counted])


def knobs_section(trials: pd.DataFrame, front: pd.DataFrame) -> list[str]:
    """Per searched parameter, the values tried by feasible trials, on the front, by infeasible ones."""
    done = _measured(trials)
    searched = [n for n in PARAMETERS if n in done and done[n].notna().any()]
    lines = ["### Ranges explored", "",
             "Range of each searched parameter (min – max, number of trials) among the measured trials "
             "(descriptive: where the search went, feasible or not, and what the front kept).", ""]
    if not searched:
        return [*lines, "No parameter was searched in a measured trial.", ""]
    lines += ["| parameter | feasible trials | Pareto front | infeasible trials |", "| :--- | :--- | :--- | :--- |"]
    feasible = done[done["feasible"].astype(bool)]
    infeasible = done[~done["feasible"].astype(bool)]
    on_front = front[~front["baseline"].astype(bool)] if not front.empty else front
    for name in searched:
        kind = PARAMETERS[name].kind
        cells = [_span(_param_values(rows, name), kind,
                       [str(v) for v in rows[name] if not pd.isna(v) and _is_word(v, kind)])
                 if not rows.empty else "-"
                 for rows in (feasible, on_front, infeasible)]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


def drift_section(trials: pd.DataFrame) -> list[str]:
    """The baseline's measurements: the first one and every drift re-measurement."""
    done = _measured(trials)
    base = done[done["baseline"].astype(bool)] if not done.empty else done
    lines = ["## Baseline drift checks", ""]
    if len(base) < 2:
        return [*lines, "No re-measurement of the baseline (measurement.driftEvery is 0 or the study was short).", ""]
    lines += ["The Istio-default baseline, measured again during the search; each trial is compared with "
              "the nearest baseline, so slow drift of the machine or cluster cancels out.", "",
              "| trial | p95 latency (ms) | drift vs first baseline |", "| ---: | ---: | ---: |"]
    for _, r in base.iterrows():
        drift = "first" if r["trial"] == base["trial"].min() else pct(r.get("drift_pct"))
        lines.append(f"| {r['trial']} | {fmt(r.get('latency_p95_ms'))} | {drift} |")
    return [*lines, ""]


def confirmation_section(front: pd.DataFrame, objectives: Sequence[str],
                         confirmation: Confirmation | None) -> list[str]:
    """Each confirmed-or-not Pareto config with every objective's change and its interval, and
    the knobs its measured (minimal) config had back at Istio's default."""
    lines = ["## Confirmation", ""]
    rows = front[front["confirmed"].notna()] if "confirmed" in front else front.iloc[0:0]
    if rows.empty:
        return [*lines, "The front was not confirmed (measurement.confirmRounds is 0, or the study has "
                "not used its budget yet): its numbers come from single measurements.", ""]
    rounds = confirmation.rounds if confirmation else "?"
    confidence = confirmation.confidence if confirmation else 0.0
    lines += [f"Each Pareto config and the baseline were measured again in {rounds} "
              f"interleaved rounds; changes are paired against the same round's baseline, with "
              f"{100 * confidence:.0f} % confidence intervals. A config is confirmed "
              "when it stayed feasible in every round and an objective improved beyond its interval. "
              "Each was measured as its minimal config (the manifests' config): the knobs in "
              "`reset` had no detected effect and were left at Istio's default.", "",
              "| trial | confirmed | " + " | ".join(f"{metric_name(m)} change [CI]" for m in objectives)
              + " | reset | note |", "| ---: | :--- | " + " | ".join("---:" for _ in objectives)
              + " | :--- | :--- |"]
    results = confirmation.results if confirmation else {}
    for _, r in rows.iterrows():
        changes = [f"{pct(r.get(f'{m}_confirmed_change_pct'))} [{pct(r.get(f'{m}_ci_low_pct'))}, "
                   f"{pct(r.get(f'{m}_ci_high_pct'))}]" for m in objectives]
        note = r.get("confirmation_note")
        entry = results.get(int(r["trial"]))
        reset = ", ".join(f"`{k}`" for k in entry.reset) if entry and entry.reset else "-"
        lines.append(f"| {r['trial']} | {'yes' if r['confirmed'] else 'no'} | " + " | ".join(changes)
                     + f" | {reset} | {'' if pd.isna(note) or note is None else note} |")
    return [*lines, ""]


def recommended(front: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """The config to apply and why: the first confirmed one (best first objective), else the
    Pareto config with the best first objective that is not the baseline."""
    if front.empty:
        return None, "no feasible config"
    cands = front[~front["baseline"].astype(bool)]
    if "confirmed" in cands:
        confirmed = cands[cands["confirmed"].fillna(False).astype(bool)]
        if not confirmed.empty:
            return confirmed.iloc[0], "the confirmed Pareto config with the best first objective"
    if cands.empty:
        return None, "the baseline (Istio defaults) is the only Pareto config: nothing to apply"
    return cands.iloc[0], "the Pareto config with the best first objective (not confirmed)"


def apply_section(front: pd.DataFrame, out_dir: Path, deployment: str, namespace: str) -> list[str]:
    """The commands that apply the recommended config's manifests."""
    row, why = recommended(front)
    lines = ["## Apply the recommended config", ""]
    if row is None:
        return [*lines, f"Nothing to apply: {why}.", ""]
    folder = out_dir / f"trial-{int(row['trial']):03d}"
    minimal, reset = row.get("minimal_config"), row.get("reset_to_default")
    if isinstance(reset, str) and reset and isinstance(minimal, str):
        what = (f"`{minimal}` ({why}; searched as `{row['config']}`, the knobs with no detected "
                f"effect left at Istio's default: {reset})")
    else:
        what = f"`{row['config']}` ({why})"
    return [*lines, f"Recommended: trial {row['trial']} — {what}.", "",
            "```sh",
            f"kubectl apply -f {folder / 'destinationrule.yaml'}",
            f"kubectl -n {namespace} patch deployment {deployment} --type merge "
            f"--patch-file {folder / 'deployment-patch.yaml'}",
            "```", "",
            "Every Pareto config has its own `trial-NNN/` folder with the same two files.", ""]


def report_markdown(study_name: str, objectives: Sequence[str], directions: Sequence[str],
                    trials: pd.DataFrame, front: pd.DataFrame, table_frame: pd.DataFrame,
                    confirmation: Confirmation | None, out_dir: Path, deployment: str,
                    namespace: str, effects: KnobEffects | None = None,
                    scenarios: Sequence[str] = (), extra: Sequence[str] = ()) -> str:
    """The whole report as Markdown. ``front`` is ``pareto_frame`` (what ``pareto.csv`` holds),
    ``table_frame`` the front with the baseline row (``front_with_baseline``), ``effects`` the
    study's knob verdicts, ``scenarios`` the study's scenario names (with two or more, a table per
    scenario follows the Pareto table); ``extra`` lines (a scheduled run's "What changed") come
    right after the summary."""
    done = _measured(trials)
    n_base = int(done["baseline"].astype(bool).sum()) if not done.empty else 0
    n_feasible = int(done["feasible"].astype(bool).sum()) if not done.empty else 0
    n_failed = int((trials["state"] == "FAIL").sum()) if not trials.empty else 0
    goal = ", ".join(f"{metric_name(m)} ({d})" for m, d in zip(objectives, directions, strict=True))
    lines = [f"# Study {study_name}", "",
             f"Objectives: {goal}. {len(done)} measured trials ({n_base} of the baseline), "
             f"{n_feasible} feasible, {len(done) - n_feasible} infeasible, {n_failed} failed.", "",
             *extra, "## Pareto front against the baseline", ""]
    if table_frame.empty:
        lines += ["No feasible config yet: every measured config broke a constraint or failed.", ""]
    else:
        table = pareto_text_table(table_frame, list(objectives), "")
        lines += ["Feasible configs no other feasible config beats on every objective; `vs base` is the "
                  "change against the nearest baseline measurement. Same numbers as `pareto.csv`.", "",
                  table.markdown(), ""]
        for scenario_table in scenario_text_tables(table_frame, scenarios):
            lines += [f"### {scenario_table.title}", "", scenario_table.markdown(), ""]
    lines += confirmation_section(front, objectives, confirmation)
    lines += drift_section(trials)
    lines += knob_effects_section(effects)
    lines += knobs_section(trials, front)
    lines += apply_section(front, out_dir, deployment, namespace)
    units = ", ".join(f"`{label(m)}` = {metric_name(m)}" for m in objectives)
    lines += [f"Columns: {units}; `rps` achieved requests/s; `errors` error rate.", ""]
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em}pre{background:#f4f4f4;padding:.5em}")


def report_html(markdown: str, figure: go.Figure | None, title: str) -> str:
    """A self-contained page: the report rendered from Markdown, then the Pareto chart with
    plotly.js embedded (readable offline, no CDN)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    chart = figure.to_html(include_plotlyjs=True, full_html=False) if figure is not None else ""
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}<h2>Pareto chart</h2>{chart}</body></html>\n")


def publish(study: optuna.Study, markdown: str, figure: go.Figure | None) -> None:
    """Save the report as the study's note and the chart as its plotly graph for optuna-dashboard."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    save_note(study, markdown)
    if figure is not None:
        save_plotly_graph_object(study, figure, graph_object_id=PARETO_GRAPH_ID)


def _workload(spec: Mapping[str, object]) -> tuple[str, str]:
    """The Deployment and namespace the deployment patch is for (``spec`` as JSON, see
    ``study_spec``): the Kubernetes target's, else placeholders (a local study tuned a stand-in
    sidecar) in the service's namespace."""
    target, service = spec.get("target"), spec.get("service")
    if isinstance(target, dict) and target.get("kind") == "kubernetes":
        return str(target["deployment"]), str(target["namespace"])
    namespace = service.get("namespace", "default") if isinstance(service, dict) else "default"
    return "<client-deployment>", str(namespace)


def write_report(study: optuna.Study, out_dir: Path, trials: pd.DataFrame, front: pd.DataFrame,
                 table_frame: pd.DataFrame, *, objectives: Sequence[str], spec: Mapping[str, object],
                 confirmation: Confirmation | None, effects: KnobEffects | None = None,
                 extra: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``pareto.html`` under ``out_dir`` and save the report
    as the study's note with the Pareto chart. ``trials``/``front``/``table_frame`` are
    ``trials_frame``/``pareto_frame``/``front_with_baseline`` of the study. Overwrites."""
    directions = [d.name.lower() for d in study.directions]
    figure = pareto_figure(study.study_name, objectives, trials, front)
    deployment, namespace = _workload(spec)
    raw = spec.get("scenarios")
    scenarios = [str(s["name"]) for s in raw if isinstance(s, dict) and "name" in s] if isinstance(raw, list) else []
    md = report_markdown(study.study_name, objectives, directions, trials, front, table_frame,
                         confirmation, out_dir, deployment, namespace, effects, scenarios, extra)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md, encoding="utf-8")
    html_path.write_text(report_html(md, figure, f"Study {study.study_name}"), encoding="utf-8")
    if figure is not None:
        figure.write_html(out_dir / "pareto.html", include_plotlyjs="cdn")
    publish(study, md, figure)
    return md_path, html_path
