"""Which knobs matter: the verdict on a replayed landscape where 2 knobs act and 3 do not, the
minimal configs the export writes and the confirmation measures, and the stored records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from _specs import small_spec
from autotune.export import export_study, knob_effects_table, pareto_frame, results_dir
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import (
    MIN_TRIALS_PER_KNOB,
    KnobEffects,
    KnobTest,
    KnobVerdict,
    TrialRecord,
    confirm_front,
    confirmation_of,
    constraint_values,
    effect_metrics,
    knob_effects,
    knob_effects_of,
    make_sampler,
    measure_config,
    minimal_config,
    objective_values,
    pareto_trials,
    run_study,
)
from autotune.study._effects import analyse
from autotune.study._loop import suggest
from autotune.study._record import set_confirmation, set_knob_effects
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget

pytestmark = pytest.mark.usefixtures("fast_storage")

EFFECTIVE = ["proxy.cpuLimit", "connectionPool.tcp.maxConnections"]
NULL = ["connectionPool.http.http1MaxPendingRequests", "connectionPool.http.maxRequestsPerConnection",
        "connectionPool.http.maxRetries"]


def _spec(tmp_path: Path, trials: int, seed: int, sampler: str = "tpe", **extra: object) -> StudySpec:
    return small_spec(tmp_path, **{
        "study.trials": trials, "study.sampler": sampler, "study.seed": seed,
        "measurement.repeats": 3, "measurement.maxRepeats": 3,
        "objectives": ["latency_p95_ms", "cpu_used_cores"],
        "parameters": {"proxy.cpuLimit": {"low": "100m", "high": "1", "log": True},
                       "connectionPool.tcp.maxConnections": {"low": 1, "high": 256, "log": True},
                       **{n: {"low": 1, "high": 1024, "log": True} for n in NULL}},
        **extra})


def _landscape(seed: int, noise_cv: float = 0.1, acting: bool = True) -> Landscape:
    """p95 rises as the CPU limit falls (+50 % at 100m, +5 % at 1 core) and as connections get
    few (×2 at 4, +6 % at 64); CPU used rises with the limit (0.032 → 0.05 cores). The other three
    knobs do nothing. Noise: each window's latencies vary by ``noise_cv`` (log-normal; a trial is
    the median of 3 windows) and each trial's CPU by ``noise_cv``. ``acting=False``: no knob acts."""
    rng = np.random.default_rng(seed + 1000)

    def point(c: MeshConfig) -> Point:
        p95, cpu = 5.0, 0.04
        if acting:
            p95 = 5.0 * (1 + 0.05 / c.effective_cpu_limit) * (1 + 4.0 / (c.max_connections or 10**6))
            cpu = 0.03 + 0.02 * c.effective_cpu_limit
        cpu *= float(np.exp(rng.normal(0.0, noise_cv)))
        return Point(p95 / 2, p95, p95 * 1.2, cpu_cores=cpu, noise_cv=noise_cv)

    return Landscape.synthetic(point, seed=seed)


def _searched(spec: StudySpec, land: Landscape) -> optuna.Study:
    """The spec's search on the replay target and driver, recorded as the loop records it, in an
    in-memory study (the statistics need many studies; the loop's own storage would take seconds
    each): the spec's sampler proposes, ``measure_config`` measures, the trial's record and
    constraints are written, the objective values told."""
    study = optuna.create_study(directions=[o.direction for o in spec.objectives],
                                sampler=make_sampler(spec.study.sampler, spec.study.seed))
    with ReplayTarget(land) as target:
        for _ in range(spec.study.trials):
            trial = study.ask()
            config = suggest(trial, spec.search_space())
            m = measure_config(target, spec, config, load=ReplayDriver(land))
            for name, value in constraint_values(spec.scenario_list(), m.metrics):
                trial.set_constraint(name, value)
            TrialRecord(config=config, metrics=m.metrics).write(trial)
            study.tell(trial, objective_values(spec.objectives, m.metrics))
    return study


SEEDS = range(10)


def test_the_verdict_finds_the_acting_knobs_and_not_the_others(tmp_path: Path) -> None:
    """29 TPE trials per study, 10 seeds. Measured over 40 seeds: each acting knob found in
    36/40 studies (both in 17 of the first 20), a null knob flagged in 2/40 (the family-wise rate
    promised is at most 10 %). On these seeds: 9 and 10 of 10, and 1 null flag of 30. A rule that
    flags everything, or nothing, fails; so does one that tests each knob-metric pair at 10 %
    without the family-wise adjustment (7 null pairs rejected on these seeds)."""
    found = {k: 0 for k in EFFECTIVE + NULL}
    for seed in SEEDS:
        spec = _spec(tmp_path, 29, seed)
        effects = knob_effects(_searched(spec, _landscape(seed)), spec, seed=seed)
        assert effects is not None and effects.models["steady.latency_p95_ms"] == "conditional"
        for v in effects.verdicts:
            found[v.parameter] += v.matters
            assert v.matters == bool(v.where) and all(t.p_value <= effects.alpha for t in v.tests
                                                      if t.metric in v.where)
    assert found["proxy.cpuLimit"] >= 8 and found["connectionPool.tcp.maxConnections"] >= 8, found
    assert sum(found[k] for k in NULL) <= 2, found


def test_when_no_knob_acts_the_table_rarely_flags_one(tmp_path: Path) -> None:
    """The same search on noise alone: a knob flagged in at most 2 of 10 studies (alpha 0.10;
    measured: 3 of 40 studies, 1 of these 10; a rule without the family-wise adjustment rejects
    a knob-metric pair in about 1 study in 4)."""
    flagged = 0
    for seed in SEEDS:
        spec = _spec(tmp_path, 29, seed)
        effects = knob_effects(_searched(spec, _landscape(seed, acting=False)), spec, seed=seed)
        assert effects is not None and effects.alpha == pytest.approx(0.10)
        flagged += any(v.matters for v in effects.verdicts)
    assert flagged <= 2


def test_the_family_names_every_scenario_metric_and_a_deterministic_cost_is_attributed(tmp_path: Path) -> None:
    spec = _spec(tmp_path, 12, 0, sampler="random", objectives=["latency_p95_ms", "cpu_limit_cores"])
    assert effect_metrics(spec) == ["steady.latency_p95_ms", "steady.cpu_limit_cores",
                                    "steady.error_rate", "steady.throughput_ratio"]
    effects = knob_effects(_searched(spec, _landscape(0, noise_cv=0.02)), spec)
    assert effects is not None and effects.trials == 12
    limit = effects.verdict("proxy.cpuLimit")
    assert limit is not None and "steady.cpu_limit_cores" in limit.where
    assert limit.tests[0].effect == pytest.approx(1.0)  # the limit is its own cost
    # No error and full throughput in every trial: nothing to explain, those metrics are not tested.
    assert set(effects.models) == {"steady.latency_p95_ms", "steady.cpu_limit_cores"}


def test_too_few_trials_give_no_verdict(tmp_path: Path) -> None:
    spec = _spec(tmp_path, 5, 0, sampler="random")
    assert knob_effects(_searched(spec, _landscape(0)), spec) is None


def test_a_choice_and_an_unset_cpu_limit_are_tested_like_any_knob() -> None:
    """One-hot for ``loadBalancer.simple`` (RANDOM is 30 % slower), the effective limit for a CPU
    limit that may be unset (the node's CPUs then; the CPU limit cost follows it exactly)."""
    rng = np.random.default_rng(7)
    configs, metrics = [], []
    for i in range(30):
        limit = None if i % 5 == 0 else round(float(rng.uniform(0.1, 1.0)), 3)
        config = MeshConfig(lb_simple=str(rng.choice(["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"])),
                            cpu_limit=limit, no_cpu_limit=limit is None,
                            max_retries=int(rng.integers(1, 1000)))
        p95 = 5.0 * (1.3 if config.lb_simple == "RANDOM" else 1.0) * float(np.exp(rng.normal(0, 0.05)))
        configs.append(config)
        metrics.append({"latency_p95_ms": p95, "cpu_limit_cores": config.effective_cpu_limit})
    knobs = ["loadBalancer.simple", "proxy.cpuLimit", "connectionPool.http.maxRetries"]
    effects = analyse(knobs, configs, metrics, ["steady.latency_p95_ms", "steady.cpu_limit_cores"],
                      first="steady", alpha=0.1)
    assert effects is not None
    verdicts = {v.parameter: v for v in effects.verdicts}
    assert verdicts["loadBalancer.simple"].where == ["steady.latency_p95_ms"]
    assert verdicts["proxy.cpuLimit"].where == ["steady.cpu_limit_cores"]
    assert not verdicts["connectionPool.http.maxRetries"].matters


def _effects(null: list[str], acting: list[str], trials: int = 20) -> KnobEffects:
    verdicts = [KnobVerdict(k, True, ["steady.latency_p95_ms"], [KnobTest("steady.latency_p95_ms", 0.6, 0.001)])
                for k in acting]
    verdicts += [KnobVerdict(k, False, [], [KnobTest("steady.latency_p95_ms", 0.05, 0.9)]) for k in null]
    return KnobEffects(alpha=0.1, permutations=2000, trials=trials,
                       models={"steady.latency_p95_ms": "conditional"}, verdicts=verdicts)


def test_minimal_config_leaves_out_the_knobs_without_effect() -> None:
    config = MeshConfig(cpu_limit=0.3, max_connections=8, http1_max_pending_requests=64, max_retries=3,
                        concurrency=2)
    minimal, reset = minimal_config(config, _effects(NULL, EFFECTIVE))
    assert minimal == MeshConfig(cpu_limit=0.3, max_connections=8, concurrency=2)  # concurrency: untested
    assert reset == ["connectionPool.http.http1MaxPendingRequests", "connectionPool.http.maxRetries"]
    # A CPU limit without effect goes back to Istio's 2000m, "unset" (no limit) included.
    unlimited = MeshConfig(no_cpu_limit=True, max_connections=8)
    assert minimal_config(unlimited, _effects(["proxy.cpuLimit"], [])) == (
        MeshConfig(max_connections=8), ["proxy.cpuLimit"])
    # Nothing to reset, or no verdicts: the config as searched.
    assert minimal_config(config, _effects([], EFFECTIVE + NULL)) == (config, [])
    assert minimal_config(config, None) == (config, [])


def test_with_too_few_trials_per_knob_nothing_is_reset() -> None:
    """Fewer than MIN_TRIALS_PER_KNOB analysed trials per knob (a 10-trial demo over 6 knobs):
    the test misses real effects too often, so the minimal config is the config as searched, and
    the verdict table says why."""
    config = MeshConfig(cpu_limit=0.3, max_connections=8, http1_max_pending_requests=64, max_retries=3)
    knobs = len(NULL) + len(EFFECTIVE)
    enough = _effects(NULL, EFFECTIVE, trials=MIN_TRIALS_PER_KNOB * knobs)
    few = _effects(NULL, EFFECTIVE, trials=MIN_TRIALS_PER_KNOB * knobs - 1)
    assert minimal_config(config, enough)[1] == ["connectionPool.http.http1MaxPendingRequests",
                                                 "connectionPool.http.maxRetries"]
    assert minimal_config(config, few) == (config, [])
    assert "Too few trials to leave any knob at its default" in knob_effects_table(few).title
    assert "Too few trials" not in knob_effects_table(enough).title


def test_the_records_round_trip_and_old_confirmations_still_load(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize"])
    assert knob_effects_of(study) is None
    effects = _effects(NULL, EFFECTIVE)
    set_knob_effects(study, effects)
    stored = knob_effects_of(study)
    assert stored == effects and stored is not None and stored.null_knobs == NULL
    study.set_user_attr("knob_effects", {"alpha": "x"})  # written by a version this one cannot read
    assert knob_effects_of(study) is None
    # A confirmation stored before the minimal configs (no "reset") loads with nothing reset.
    study.set_user_attr("confirmation", {
        "trials": [3], "rounds": 2, "confidence": 0.9, "baseline": {"latency_p95_ms": [5.0, 5.1]},
        "results": {"3": {"rounds": 2, "infeasible_rounds": 0, "changes": {}, "confirmed": False,
                          "reason": "fewer than 2 paired rounds"}}})
    old = confirmation_of(study)
    assert old is not None and old.results[3].reset == []
    set_confirmation(study, old)
    assert "reset" not in study.user_attrs["confirmation"]["results"]["3"]  # unchanged JSON


def test_the_table_shows_every_parameter_with_where_and_effect() -> None:
    effects = _effects(NULL, EFFECTIVE)
    table = knob_effects_table(effects)
    assert table.headers == ["parameter", "matters?", "where (scenario.metric)", "effect size / p-value"]
    rows = {r[0]: r for r in table.rows}
    assert set(rows) == set(EFFECTIVE + NULL)
    assert rows["proxy.cpuLimit"][1:] == ["yes", "steady.latency_p95_ms", "R²=0.60 p=0.001"]
    assert rows[NULL[0]][1:3] == ["no effect detected", "-"]
    assert "alpha 0.10" in table.title and "20 trials" in table.title


def _dr(path: Path) -> dict[str, object]:
    return dict(yaml.safe_load(path.read_text())["spec"])


def test_a_study_exports_and_confirms_minimal_configs(tmp_path: Path) -> None:
    """The whole loop on the replay seam: the verdict is stored, the Pareto configs' manifests
    leave the null knobs out, and the confirmation measured exactly those minimal configs."""
    spec = _spec(tmp_path, 24, 3, sampler="random", **{
        "measurement.confirmRounds": 2, "measurement.confirmMaxConfigs": 2, "measurement.driftEvery": 0})
    land = _landscape(3, noise_cv=0.03)
    target = ReplayTarget(land)
    study = run_study(spec, None, target, load=ReplayDriver(land))
    effects = knob_effects_of(study)
    assert effects is not None
    assert [v.parameter for v in effects.verdicts if v.matters] == EFFECTIVE
    assert effects.null_knobs == NULL
    # The confirmation: baseline, then each Pareto config's minimal config, in rounds.
    result = confirmation_of(study)
    assert result is not None and result.trials
    searched = len(study.get_trials())
    confirmed = target.applied[searched:]
    by_trial = {t.number: TrialRecord.read(t).config for t in study.get_trials()}
    minimal = {n: minimal_config(by_trial[n], effects)[0] for n in result.trials}
    assert confirmed[: len(result.trials) + 1] == [MeshConfig(), *(minimal[n] for n in result.trials)]
    for n in result.trials:
        assert minimal[n] != by_trial[n] and minimal[n].to_params().keys() == set(EFFECTIVE)
        assert result.results[n].reset == [k for k in NULL if k in by_trial[n].to_params()]
    assert all(c.to_params().keys() <= set(EFFECTIVE) for c in confirmed)  # no null knob measured
    # The export: the manifests of every Pareto config carry only the knobs that matter.
    export_study(study, results_dir(spec))
    out = results_dir(spec)
    frame = pareto_frame(study).set_index("trial")
    for t in pareto_trials(study):
        if TrialRecord.read(t).baseline:
            continue
        pool = _dr(out / f"trial-{t.number:03d}" / "destinationrule.yaml")["trafficPolicy"]
        assert pool == {"connectionPool": {"tcp": {"maxConnections": by_trial[t.number].max_connections}}}
        patch = (out / f"trial-{t.number:03d}" / "deployment-patch.yaml").read_text()
        assert f"proxyCPULimit: {by_trial[t.number].cpu_limit * 1000:.0f}m" in patch
        assert frame.loc[t.number, "reset_to_default"] == ", ".join(
            k for k in NULL if k in by_trial[t.number].to_params())
    md = (out / "report.md").read_text()
    assert "## Which knobs mattered" in md
    for k in EFFECTIVE:
        assert f"| {k} | yes | " in md
    for k in NULL:
        assert f"| {k} | no effect detected | - | " in md


def test_without_verdicts_the_searched_config_is_confirmed_and_exported(tmp_path: Path) -> None:
    """A study finished before this version (no stored verdicts) keeps its manifests and is
    confirmed as searched; when every knob matters the minimal config is the config itself."""
    spec = _spec(tmp_path, 8, 1, sampler="random", **{"measurement.confirmRounds": 0})
    land = _landscape(1, noise_cv=0.03)
    study = run_study(spec, None, ReplayTarget(land), load=ReplayDriver(land))
    study.set_user_attr("knob_effects", None)  # as a study no earlier version analysed
    assert knob_effects_of(study) is None
    export_study(study, results_dir(spec))
    front = [t for t in pareto_trials(study) if not TrialRecord.read(t).baseline]
    for t in front:
        folder = results_dir(spec) / f"trial-{t.number:03d}"
        assert (folder / "destinationrule.yaml").read_text() == TrialRecord.read(t).manifests["destinationrule.yaml"]
    target = ReplayTarget(land)
    with target:
        result = confirm_front(study, spec.with_overrides(**{"measurement.confirm_rounds": 1}), target,
                               load=ReplayDriver(land))
    assert result is not None and all(r.reset == [] for r in result.results.values())
    assert target.applied == [MeshConfig(), *(TrialRecord.read(t).config for t in front[:4])]
    set_knob_effects(study, _effects([], EFFECTIVE + NULL))
    frame = pareto_frame(study)
    assert frame["reset_to_default"].isna().all()
    assert list(frame["minimal_config"]) == list(frame["config"])
