"""Which knobs mattered, as a table (terminal and report), and the minimal config's manifests.

The verdicts are the study's stored ``KnobEffects`` (see ``autotune.study._effects`` for the rule);
nothing is recomputed here, so the terminal, the report and the exported manifests agree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pydantic

from autotune.export._table import TextTable
from autotune.mesh import MeshConfig, ServiceRef, SidecarResources, manifest_files
from autotune.study import MIN_TRIALS_PER_KNOB, KnobEffects, KnobTest, TrialRecord, can_reset

logger = logging.getLogger(__name__)


def _p(value: float) -> str:
    return f"{value:.2g}"


def _cell(test: KnobTest) -> str:
    return f"R²={test.effect:.2f} p={_p(test.p_value)}"


def knob_effects_table(effects: KnobEffects, title: str | None = None) -> TextTable:
    """One row per searched parameter: whether it matters, where (``<scenario>.<metric>``) and,
    for each metric where it matters, its effect size (partial R² on ranks) and adjusted p-value;
    for a knob with no detected effect, its strongest test, for reference."""
    title = title or (f"Which knobs matter (family-wise alpha {effects.alpha:.2f}, {effects.trials} "
                      f"trials, {effects.permutations} permutations)"
                      + ("" if can_reset(effects) else f"\n{_too_few(effects)}"))
    rows = []
    for v in effects.verdicts:
        if not v.tested:
            rows.append([v.parameter, "not tested", "-", "-"])
        elif v.matters:
            detected = [t for t in v.tests if t.metric in v.where]
            rows.append([v.parameter, "yes", ", ".join(v.where), "; ".join(map(_cell, detected))])
        else:
            best = v.tests[0]
            rows.append([v.parameter, "no effect detected", "-", f"strongest: {best.metric} {_cell(best)}"])
    return TextTable(title, ["parameter", "matters?", "where (scenario.metric)", "effect size / p-value"],
                     [False, False, False, False], rows)


def knob_effects_section(effects: KnobEffects | None) -> list[str]:
    """The report's verdict table, with the rule in one paragraph."""
    lines = ["## Which knobs mattered", ""]
    if effects is None:
        return [*lines, "Not tested: the study has too few measured trials, or it ended before this "
                "version of autotune tested its knobs. Its manifests carry every knob as searched.", ""]
    models = sorted(set(effects.models.values()))
    lines += [f"Each searched knob was tested against every objective and each scenario's constraint "
              f"metrics, over the {effects.trials} measured trials (infeasible ones included, baselines "
              "and failed trials left out): the ranks of the metric against an additive model of all "
              "knobs, the knob's partial F compared with its null distribution from "
              f"{effects.permutations} permutations of the other knobs' residuals (Freedman–Lane), "
              f"so the noise this study measured calibrates the test; the whole table keeps a "
              f"family-wise error rate of {effects.alpha:.2f} (maxT). `R²` is the share of the metric's "
              "rank variance the knob explains beyond the other knobs; `p` is adjusted for the whole "
              f"table. Model: {', '.join(models) or '-'}. \"No effect detected\" is not proof of no "
              "effect: the exported manifests leave such knobs at Istio's default, and the confirmation "
              "measured that minimal config.", ""]
    if not can_reset(effects):
        lines += [_too_few(effects), ""]
    lines += [knob_effects_table(effects, "").markdown(), ""]
    return lines


def _too_few(effects: KnobEffects) -> str:
    need = MIN_TRIALS_PER_KNOB * len(effects.verdicts)
    return (f"Too few trials to leave any knob at its default ({effects.trials} analysed, {need} needed: "
            f"{MIN_TRIALS_PER_KNOB} per knob): a real effect is missed too often with fewer, so the "
            "manifests and the confirmation keep every knob as searched.")


def minimal_manifests(record: TrialRecord, minimal: MeshConfig, reset: list[str],
                      spec: Mapping[str, object]) -> dict[str, str]:
    """The manifests of a Pareto trial's minimal config (``reset`` knobs back to Istio's default),
    written with the service and sidecar of the study's stored ``spec``; the trial's own manifests
    when nothing was reset, or when the stored spec cannot be read (logged)."""
    if not reset:
        return record.manifests
    try:
        service = ServiceRef.model_validate(spec.get("service") or {})
        sidecar = SidecarResources.model_validate(spec.get("sidecar") or {})
    except pydantic.ValidationError as exc:
        logger.warning("writing the searched config's manifests, not the minimal one's: the stored "
                       "spec's service or sidecar cannot be read (%s)", exc)
        return record.manifests
    return manifest_files(minimal, service, sidecar)
