"""Exports of a finished (or running) study, outside the loop: CSV tables, the Pareto plot and
ready-to-apply manifests per Pareto config."""

from __future__ import annotations

from autotune.export._effects import knob_effects_table
from autotune.export._files import (
    METRIC_COLUMNS,
    Exported,
    export_study,
    front_with_baseline,
    pareto_frame,
    results_dir,
    study_scenarios,
    trial_row,
    trials_frame,
)
from autotune.export._table import TextTable, pareto_text_table, scenario_text_tables
from autotune.study import MANIFESTS

__all__ = [
    "MANIFESTS",
    "METRIC_COLUMNS",
    "Exported",
    "TextTable",
    "export_study",
    "front_with_baseline",
    "knob_effects_table",
    "pareto_frame",
    "pareto_text_table",
    "results_dir",
    "scenario_text_tables",
    "study_scenarios",
    "trial_row",
    "trials_frame",
]
