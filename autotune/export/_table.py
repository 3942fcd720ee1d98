"""The Pareto table as plain text cells: one formatting for the terminal, job logs and the report.

Every renderer (rich in a terminal, plain columns in a pipe, Markdown in the report) takes a
:class:`TextTable` and prints each cell whole; the numbers are formatted once, here, from
``pareto_frame`` / ``front_with_baseline``, so they match ``pareto.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from autotune.study import metric_label


@dataclass(frozen=True)
class TextTable:
    """A table of strings: ``right[i]`` says column ``i`` is right-aligned (numbers)."""

    title: str
    headers: list[str]
    right: list[bool]
    rows: list[list[str]]

    def plain(self) -> str:
        """Space-separated columns padded to the widest cell, title first; nothing is cut."""
        widths = [max([len(h), *(len(r[i]) for r in self.rows)]) for i, h in enumerate(self.headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if r else c.ljust(w)
                             for c, w, r in zip(cells, widths, self.right, strict=True)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([self.title, line(self.headers), rule, *(line(r) for r in self.rows)])

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        align = ["---:" if r else ":---" for r in self.right]
        return "\n".join([row(self.headers), "| " + " | ".join(align) + " |", *(row(r) for r in self.rows)])


def _missing(value: object) -> bool:
    """``None``, NaN (a float or numpy float) or pandas' ``NA``/``NaT``."""
    return (value is None or value is pd.NA or value is pd.NaT
            or (isinstance(value, float) and math.isnan(value)))


def fmt(value: object, digits: int = 2) -> str:
    """A number with ``digits`` decimals, ``-`` when missing."""
    if _missing(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(value: float | None) -> str:
    """A signed change in percent, e.g. ``-43.2%``; ``-`` when missing."""
    return "-" if value is None or _missing(value) else f"{value:+.1f}%"


def label(metric: str) -> str:
    """A metric's short column label (``p95 ms``, ``surge p95 ms``), or its name."""
    return metric_label(metric)


def pareto_text_table(frame: pd.DataFrame, objectives: list[str], title: str) -> TextTable:
    """The Pareto configs with their objectives and change against the baseline, achieved rps,
    error rate and, once confirmation ran, whether each is confirmed with the first objective's
    change and its confidence interval."""
    headers, right = ["trial", "config"], [True, False]
    for metric in objectives:
        headers += [label(metric), "vs base"]
        right += [True, True]
    headers += ["rps", "errors"]
    right += [True, True]
    confirmed = "confirmed" in frame and bool(frame["confirmed"].notna().any())
    first = objectives[0] if objectives else ""
    if confirmed:
        headers += ["confirmed", f"{label(first)} Δ (CI)"]
        right += [False, True]
    rows = []
    for _, row in frame.iterrows():
        cells = [str(row["trial"]), "baseline (Istio defaults)" if row["baseline"] else str(row["config"])]
        for metric in objectives:
            cells += [fmt(row.get(metric)), pct(row.get(f"{metric}_vs_baseline_pct"))]
        err = row.get("error_rate")
        cells += [fmt(row.get("achieved_rps"), 0), "-" if _missing(err) else f"{err:.1%}"]
        if confirmed:
            ok = row.get("confirmed")
            cells.append("-" if _missing(ok) else ("yes" if ok else "no"))
            mean = row.get(f"{first}_confirmed_change_pct")
            lo, hi = row.get(f"{first}_ci_low_pct"), row.get(f"{first}_ci_high_pct")
            cells.append("-" if _missing(mean) else f"{pct(mean)} [{pct(lo)}, {pct(hi)}]")
        rows.append(cells)
    return TextTable(title, headers, right, rows)


#: What the per-scenario tables show of each scenario, in order.
SCENARIO_METRICS = ("latency_p95_corrected_ms", "latency_p99_corrected_ms", "goodput_slo_rps", "error_rate",
                    "cpu_used_cores")


def _change(value: object, base: object) -> str:
    """``value`` against ``base`` in percent (``-`` when either is missing or the base is 0)."""
    if _missing(value) or _missing(base) or not isinstance(base, int | float) or base == 0:
        return "-"
    return pct(100.0 * (float(value) / float(base) - 1.0))  # type: ignore[arg-type]


def scenario_text_tables(frame: pd.DataFrame, scenarios: Sequence[str]) -> list[TextTable]:
    """One table per scenario: each config of ``frame`` (``front_with_baseline``: the Pareto
    configs and the first baseline) with that scenario's corrected p95/p99, goodput within the
    SLO, error rate and CPU used, each against the baseline row. Empty with fewer than two
    scenarios (the Pareto table already shows everything) or no baseline row; a metric no row
    measured is left out."""
    if len(scenarios) < 2 or frame.empty or not frame["baseline"].astype(bool).any():
        return []
    base = frame[frame["baseline"].astype(bool)].iloc[0]
    tables = []
    for scenario in scenarios:
        metrics = [m for m in SCENARIO_METRICS if f"{scenario}.{m}" in frame
                   and frame[f"{scenario}.{m}"].notna().any()]
        headers, right = ["trial"], [True]
        for m in metrics:
            headers += [label(m), "vs base"]
            right += [True, True]
        rows = []
        for _, row in frame.iterrows():
            cells = [f"{row['trial']} (baseline)" if row["baseline"] else str(row["trial"])]
            for m in metrics:
                value, ref = row.get(f"{scenario}.{m}"), base.get(f"{scenario}.{m}")
                text = ("-" if _missing(value) else f"{value:.1%}") if m == "error_rate" else fmt(value)
                cells += [text, "" if row["baseline"] else _change(value, ref)]
            rows.append(cells)
        tables.append(TextTable(f"Scenario {scenario}: the Pareto configs against Istio's default",
                                headers, right, rows))
    return tables
