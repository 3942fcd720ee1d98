"""The scheduled job on the replay target: runs of a series, the re-check of the previous
recommendation, the warm start, the flat-front stop and what each run says changed (report, last
lines, exit code), in seconds (no Envoy, no Locust)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

import autotune.study as study_api
from _specs import small_spec, write_spec
from autotune.cli import main
from autotune.errors import SpecError
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec
from autotune.study import (
    TrialRecord,
    Verdict,
    counted_trials,
    hypervolume,
    recheck_of,
    run_info,
    run_outcome_of,
    run_scheduled,
    run_study,
    stop_record,
    warm_start_of,
)
from autotune.study._stop import progress
from autotune.study._warm import fit
from autotune.targets import Observed
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget

pytestmark = pytest.mark.usefixtures("fast_storage")

BUDGET = 20


class Service:
    """A service whose time per request (ms) can change between runs. Latency: the service time
    plus the proxy's, which grows as its CPU limit falls. CPU used grows with the connections the
    proxy keeps. A pool of fewer connections than the service needs (service time / 2) cannot
    carry the load (throughput ratio 0.5: infeasible)."""

    def __init__(self, service_ms: float) -> None:
        self.service_ms = service_ms

    def point(self, config: MeshConfig) -> Point:
        conns = config.max_connections or 1024
        p95 = self.service_ms + 1.0 / config.effective_cpu_limit
        return Point(p95 * 0.6, p95, p95 * 1.2, cpu_cores=0.02 + 0.005 * config.effective_cpu_limit + 0.01 * conns,
                     throughput_ratio=1.0 if conns >= self.service_ms / 2 else 0.5, noise_cv=0.02)


SPACE = {"connectionPool.tcp.maxConnections": {"low": 2, "high": 16},
         "proxy.cpuLimit": {"low": "100m", "high": "2", "log": True}}
SERIES = {"study.name": "svc", "study.trials": BUDGET, "study.sampler": "tpe", "parameters": SPACE,
          "objectives": ["cpu_used_cores", "latency_p95_ms"], "measurement.repeats": 2,
          "measurement.maxRepeats": 2, "measurement.confirmRounds": 2}
DAY0 = datetime(2026, 11, 25, 1, tzinfo=UTC)


class Scheduled:
    """``run_scheduled`` as the CLI calls it, on the replay target of ``service``, one day later
    on each call (run names are by UTC time)."""

    def __init__(self, service: Service, applied: MeshConfig | None = None) -> None:
        self.service, self.applied, self.day = service, applied, 0
        self.targets: list[ReplayTarget] = []

    def __call__(self, spec: StudySpec, observer: Any = None, **_: Any) -> study_api.RunResult:
        land = Landscape.synthetic(self.service.point, seed=self.day)
        target = _Deployed(land, self.applied)
        self.targets.append(target)
        day = self.day
        self.day += 1
        return run_scheduled(spec, observer, target, load=ReplayDriver(land), now=lambda: DAY0 + timedelta(days=day))


class _Deployed(ReplayTarget):
    """A replay target whose baseline state (what is deployed before autotune touches it) runs
    ``applied`` rather than Istio's defaults, as a cluster where the recommendation was applied."""

    def __init__(self, landscape: Landscape, applied: MeshConfig | None) -> None:
        super().__init__(landscape)
        self.deployed = applied
        self.at_start_state = True  # after start and restore: what was deployed

    def apply(self, config: MeshConfig) -> None:
        self.at_start_state = False
        super().apply(config)

    def restore(self) -> None:
        super().restore()
        self.at_start_state = True

    def observed(self) -> Observed:
        if self.at_start_state and self.deployed is not None:
            return Observed.expected(self.deployed)
        return super().observed()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[CliRunner, Service, Scheduled]]:
    service = Service(4.0)
    scheduled = Scheduled(service)
    monkeypatch.setattr(study_api, "run_scheduled", scheduled)
    yield CliRunner(), service, scheduled


def _run(runner: CliRunner, spec: Path) -> tuple[int, str]:
    result = runner.invoke(main, ["study", "run-scheduled", str(spec)], catch_exceptions=False)
    return result.exit_code, result.output


def _load(spec: StudySpec, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=spec.study.storage)


def _runs(spec: StudySpec) -> list[str]:
    names = [s.study_name for s in optuna.get_all_study_summaries(spec.study.storage)]
    return sorted(n for n in names if n.startswith("svc-"))


def test_three_runs_unchanged_then_changed_after_the_service_slowed(
        tmp_path: Path, cli: tuple[CliRunner, Service, Scheduled]) -> None:
    runner, service, _ = cli
    path = write_spec(tmp_path, **SERIES)
    spec = small_spec(tmp_path, **SERIES)

    # Run 1: nothing to re-check; a first recommendation ("changed", exit 3), found before the budget.
    code, output = _run(runner, path)
    assert code == 3, output
    (first,) = _runs(spec)
    assert first == "svc-20261125T010000Z"
    run1 = _load(spec, first)
    out1 = run_outcome_of(run1)
    assert out1 is not None and out1.verdict == Verdict.CHANGED and out1.previous is None
    assert out1.recommendation is not None and out1.recommendation.source is not None
    rec1 = out1.recommendation.config
    assert counted_trials(run1) < BUDGET and stop_record(run1).stopped_after == counted_trials(run1)
    info = run_info(run1)
    assert info is not None and info.series == "svc" and info.previous is None and info.version
    assert f"{first}: recommendation changed: {rec1.describe()}" in output  # the job's last lines
    assert "why: the first run of the series" in output

    # Run 2, same service: the recommendation holds ("unchanged", exit 0); warm-started from run 1.
    code, output = _run(runner, path)
    assert code == 0, output
    second = _runs(spec)[1]
    run2 = _load(spec, second)
    out2 = run_outcome_of(run2)
    assert out2 is not None and out2.verdict == Verdict.UNCHANGED and out2.previous == first
    assert out2.recommendation is not None and out2.recommendation.config == rec1
    checked = recheck_of(run2)
    assert checked is not None and checked.rounds == 2 and checked.applied_is_baseline
    rec_entry = checked.recommendation()
    assert rec_entry is not None and rec_entry.holds and rec_entry.config == rec1
    assert rec_entry.before and rec_entry.changes["cpu_used_cores"].high_pct < 0
    warm = warm_start_of(run2)
    assert warm is not None and warm.previous == first and warm.spec_hash_matched and warm.carried
    records = [TrialRecord.read(t) for t in run2.get_trials()]
    carried = [r for r in records if r.carried_from is not None]
    assert [r.carried_from for r in carried] == [c.source for c in warm.carried]
    assert records[0].baseline and all(r.carried_from for r in records[1:1 + len(carried)])  # first, re-measured
    assert all(r.metrics for r in carried)  # measured again, not copied
    assert counted_trials(run2) < BUDGET and stop_record(run2).stopped_after is not None
    assert f"{second}: recommendation unchanged: {rec1.describe()}" in output
    report2 = (tmp_path / "out" / second / "report.md").read_text()
    assert "**Recommendation unchanged** (exit code 0)" in report2 and "### Warm start" in report2
    assert "### Re-check" in report2 and "### Early stop" in report2 and "## Pareto front" in report2

    # The service slows down: the old pool cannot carry the load any more.
    service.service_ms = 16.0
    code, output = _run(runner, path)
    assert code == 3, output
    third = _runs(spec)[2]
    run3 = _load(spec, third)
    out3 = run_outcome_of(run3)
    assert out3 is not None and out3.verdict == Verdict.CHANGED and out3.previous == second
    assert out3.recommendation is not None
    rec3 = out3.recommendation.config
    assert rec3 != rec1 and (rec3.max_connections or 1024) >= 8  # what the slower service needs
    entry = recheck_of(run3)
    assert entry is not None
    prev = entry.recommendation()
    assert prev is not None and prev.holds is False and prev.infeasible_rounds == 2
    moved = {(m.what, m.metric) for m in out3.moved}
    assert ("baseline", "latency_p95_ms") in moved  # +300 %: the service, not noise
    assert "no longer holds" in " ".join(out3.reasons)
    assert counted_trials(run3) < BUDGET and stop_record(run3).stopped_after is not None
    assert f"{third}: recommendation changed: {rec3.describe()}" in output and "moved: baseline p95 ms" in output
    folder = tmp_path / "out" / third
    assert json.loads((folder / "outcome.json").read_text())["verdict"] == "changed"
    dr = (folder / "recommended" / "destinationrule.yaml").read_text()
    assert f"maxConnections: {rec3.max_connections}" in dr
    report3 = (folder / "report.md").read_text()
    assert "**Recommendation changed** (exit code 3)" in report3 and "| **no** |" in report3

    # autotune study list: the runs of the series in order, with their outcome.
    listing = runner.invoke(main, ["study", "list", "--storage", spec.study.storage]).output
    rows = [line for line in listing.splitlines() if "svc-2026" in line]
    assert [r.split()[1] for r in rows] == [first, second, third]
    assert ["changed" in rows[0], "unchanged" in rows[1], "changed" in rows[2]] == [True] * 3


def test_the_applied_config_is_rechecked_against_the_baseline(tmp_path: Path) -> None:
    """A target that runs something other than Istio's defaults (the recommendation applied, or a
    hand-tuned config) has it measured in the re-check, once, with its role."""
    spec = small_spec(tmp_path, **SERIES)
    service = Service(4.0)
    Scheduled(service)(spec)
    first = _runs(spec)[0]
    out1 = run_outcome_of(_load(spec, first))
    assert out1 is not None and out1.recommendation is not None
    hand_tuned = MeshConfig(max_connections=12, cpu_limit=1.0)
    for applied, roles in ((out1.recommendation.config, ["previous recommendation", "applied"]),
                           (hand_tuned, ["applied"])):
        scheduled = Scheduled(service, applied=applied)
        scheduled.day = 1 + len(_runs(spec))
        result = scheduled(spec)
        assert not result.recheck.applied_is_baseline
        entry = next(c for c in result.recheck.configs if "applied" in c.roles)
        assert entry.roles == roles and entry.config == applied and entry.rounds == 2
        assert entry.changes["cpu_used_cores"].mean_pct < 0
        measured = scheduled.targets[0].applied[: 2 * (1 + len(result.recheck.configs))]
        assert measured.count(applied) == 2 and measured.count(MeshConfig()) == 2  # once per round


def test_the_warm_start_says_which_configs_fit_the_new_space(tmp_path: Path) -> None:
    space = [p for p in small_spec(tmp_path, parameters={
        "connectionPool.tcp.maxConnections": {"low": 4, "high": 64},
        "proxy.concurrency": {"low": 1, "high": 2},
        "proxy.cpuLimit": {"low": "100m", "high": "1", "unset": True}}).search_space()]
    params, sampled, reason = fit(MeshConfig(max_connections=8, cpu_limit=0.5), space)
    assert reason is None and sampled == ["proxy.concurrency"]
    assert params == {"connectionPool.tcp.maxConnections": 8, "proxy.cpuLimit:unset": False, "proxy.cpuLimit": 0.5}
    assert fit(MeshConfig(no_cpu_limit=True), space)[0] == {"proxy.cpuLimit:unset": True}
    assert fit(MeshConfig(max_connections=2), space)[2] == (
        "connectionPool.tcp.maxConnections=2 is outside the new range 4..64")
    assert fit(MeshConfig(max_retries=3), space)[2] == (
        "sets connectionPool.http.maxRetries, which the search space no longer has")


def test_a_changed_spec_carries_only_the_configs_that_still_fit(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **SERIES)
    service = Service(4.0)
    Scheduled(service)(spec)
    narrower = small_spec(tmp_path, **{**SERIES, "parameters": {
        **SPACE, "connectionPool.tcp.maxConnections": {"low": 3, "high": 16}}})
    scheduled = Scheduled(service)
    scheduled.day = 1
    result = scheduled(narrower)
    warm = result.warm_start
    assert not warm.spec_hash_matched
    assert warm.dropped and all("outside the new range 3..16" in d.reason for d in warm.dropped if d.reason)
    assert all(MeshConfig.from_params(dict(c.params)).max_connections >= 3 for c in warm.carried)  # type: ignore[operator]
    report = result.outcome.lines()
    assert report[0].startswith(f"{result.study.study_name}: recommendation")


def test_study_start_stops_early_only_when_the_spec_says(tmp_path: Path) -> None:
    land = Landscape.synthetic(Service(4.0).point)
    on = small_spec(tmp_path, **{**SERIES, "study.name": "on", "measurement.stopAfterFlat": 3})
    study = run_study(on, target=ReplayTarget(land), load=ReplayDriver(land))
    stop = stop_record(study)
    assert stop.stopped_after == counted_trials(study) < BUDGET and stop.flat >= 3 and stop.after_flat == 3
    assert progress(study, on).flat >= 3
    off = small_spec(tmp_path, **{**SERIES, "study.name": "off"})
    study = run_study(off, target=ReplayTarget(land), load=ReplayDriver(land))
    assert counted_trials(study) == BUDGET and stop_record(study).stopped_after is None


def test_stop_after_flat_is_checked_with_its_field_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"measurement\.stopAfterFlat"):
        small_spec(tmp_path, **{"measurement.stopAfterFlat": -1})


def test_hypervolume_of_a_known_front() -> None:
    assert hypervolume([[1.0, 1.0]], [2.0, 2.0]) == pytest.approx(1.0)
    # Two steps: [0.5,1)x[1.5,2) + [1,2)x[0.5,2) = 0.25 + 1.5
    assert hypervolume([[0.5, 1.5], [1.0, 0.5]], [2.0, 2.0]) == pytest.approx(1.75)
    assert hypervolume([[0.5, 1.5], [1.0, 0.5], [1.5, 1.5]], [2.0, 2.0]) == pytest.approx(1.75)  # dominated
    assert hypervolume([[3.0, 0.1]], [2.0, 2.0]) == 0.0  # beyond the reference point
    assert hypervolume([[1.0, 1.0, 1.0]], [2.0, 2.0, 2.0]) == pytest.approx(1.0)


def test_an_interrupted_run_is_not_the_previous_one(tmp_path: Path) -> None:
    """A run stopped by Ctrl-C (the target restored) stores no outcome; the next run re-checks the
    last finished run's recommendation, not the interrupted run's half-searched front."""
    spec = small_spec(tmp_path, **SERIES)
    service = Service(4.0)
    first = Scheduled(service)(spec)
    land = Landscape.synthetic(service.point, interrupt_on_run=8)
    with pytest.raises(KeyboardInterrupt):
        run_scheduled(spec, None, ReplayTarget(land), load=ReplayDriver(land),
                      now=lambda: DAY0 + timedelta(days=1))
    interrupted = _runs(spec)[1]
    assert run_outcome_of(_load(spec, interrupted)) is None
    scheduled = Scheduled(service)
    scheduled.day = 2
    third = scheduled(spec)
    assert third.recheck.previous == first.study.study_name and third.outcome.previous == first.study.study_name
    assert third.outcome.verdict == Verdict.UNCHANGED


def test_the_applied_config_is_read_back_as_the_smallest_config() -> None:
    from autotune.study._recheck import applied_config

    assert applied_config(Observed.expected(MeshConfig())) is None
    assert applied_config(Observed.expected(MeshConfig(cpu_limit=2.0, concurrency=2))) is None  # Istio's default
    assert applied_config(Observed.expected(MeshConfig(cpu_limit=0.5))) == MeshConfig(cpu_limit=0.5)
    assert applied_config(Observed.expected(MeshConfig(cpu_limit=0.5, concurrency=3, max_connections=7))) == \
        MeshConfig(cpu_limit=0.5, concurrency=3, max_connections=7)
    limitless = Observed(pool=MeshConfig(), concurrency=4, cpu_limit=None)  # read back from a pod with no limit
    assert applied_config(limitless) == MeshConfig(no_cpu_limit=True, concurrency=4)


def test_the_baseline_change_interval() -> None:
    from autotune.study._recheck import welch_change

    same = welch_change([10.0, 10.2, 9.8], [10.1, 9.9, 10.0], 0.9)
    assert same.low_pct < 0 < same.high_pct
    slower = welch_change([10.0, 10.2, 9.8], [20.0, 20.4, 19.6], 0.9)
    assert slower.mean_pct == pytest.approx(100.0) and slower.low_pct > 90
    assert welch_change([10.0], [20.0, 21.0], 0.9).low_pct == -float("inf")  # one value: no interval


def test_a_new_config_replaces_a_holding_one_only_when_materially_better(tmp_path: Path) -> None:
    from autotune.study._recheck import Interval
    from autotune.study._retune import _beats

    spec = small_spec(tmp_path, **SERIES)  # cpu_used_cores, latency_p95_ms; driftThreshold 10 %

    def ci(mean: float, half: float = 0.0) -> Interval:
        return Interval(mean_pct=mean, low_pct=mean - half, high_pct=mean + half)

    old = {"cpu_used_cores": ci(-80.0), "latency_p95_ms": ci(5.0, 10.0)}
    assert _beats(spec, {"cpu_used_cores": ci(-90.0), "latency_p95_ms": ci(6.0, 10.0)}, old) == ["cpu_used_cores"]
    assert _beats(spec, {"cpu_used_cores": ci(-81.0), "latency_p95_ms": ci(5.0, 10.0)}, old) == []  # 5 %: noise-level
    assert _beats(spec, {"cpu_used_cores": ci(-90.0), "latency_p95_ms": ci(40.0, 5.0)}, old) == []  # slower


def test_istios_defaults_stay_the_recommendation_until_something_beats_them(tmp_path: Path) -> None:
    """A service too slow for every capped pool of the space: the first run recommends Istio's
    defaults (changed, from nothing); the next run, same service, says unchanged (no alert every
    night)."""
    spec = small_spec(tmp_path, **{**SERIES, "parameters": {
        **SPACE, "connectionPool.tcp.maxConnections": {"low": 2, "high": 3}}})
    scheduled = Scheduled(Service(16.0))
    first, second = scheduled(spec), scheduled(spec)
    assert first.outcome.verdict == Verdict.CHANGED and first.outcome.recommendation is not None
    assert first.outcome.recommendation.params == {}
    assert second.outcome.verdict == Verdict.UNCHANGED and second.outcome.recommendation is not None
    assert second.outcome.recommendation.params == {} and "Istio's defaults" in second.outcome.lines()[0]


class _ProxyCost(Service):
    """A service whose proxy costs ``cost / CPU limit`` ms: how much a low limit slows requests
    can change between runs while the service itself does not (a proxy release, a kernel)."""

    def __init__(self, cost: float) -> None:
        super().__init__(4.0)
        self.cost = cost

    def point(self, config: MeshConfig) -> Point:
        p95 = self.service_ms + self.cost / config.effective_cpu_limit
        return replace(super().point(config), latency_p50_ms=p95 * 0.6, latency_p95_ms=p95, latency_p99_ms=p95 * 1.2)


@pytest.mark.parametrize(("before", "after", "verdict"), [(1.0, 0.05, Verdict.UNCHANGED),
                                                           (0.05, 1.0, Verdict.CHANGED)])
def test_only_a_move_against_the_recommendation_breaks_it(tmp_path: Path, before: float, after: float,
                                                          verdict: Verdict) -> None:
    """The recommendation's latency cost against the baseline goes away (it still delivers what it
    promised, and better: unchanged, the move reported as better) or appears (worse beyond its
    interval: it no longer holds)."""
    spec = small_spec(tmp_path, **SERIES)
    service = _ProxyCost(before)
    scheduled = Scheduled(service)
    first = scheduled(spec)
    service.cost = after
    second = scheduled(spec)
    rec = first.outcome.recommendation
    assert rec is not None and rec.params
    checked = recheck_of(_load(spec, second.outcome.run))
    assert checked is not None
    entry = checked.recommendation()
    assert entry is not None and entry.params == rec.params
    assert "latency_p95_ms" in entry.moved  # beyond its interval either way
    assert second.outcome.verdict == verdict, second.outcome.lines()
    direction = "better" if verdict == Verdict.UNCHANGED else "worse"
    assert any(m.what == "previous recommendation" and m.metric == "latency_p95_ms"
               and m.text.endswith(f"({direction})") for m in second.outcome.moved), second.outcome.lines()
    if verdict == Verdict.CHANGED:
        assert entry.holds is False and entry.reason == "worse beyond its interval: latency_p95_ms"
    else:
        assert entry.holds is True and entry.worse == []
        assert second.outcome.recommendation is not None and second.outcome.recommendation.params == rec.params


class _Broken(Service):
    """Every config, Istio's default included, loses half its requests."""

    def point(self, config: MeshConfig) -> Point:
        return Point(3.0, 5.0, 6.0, cpu_cores=0.1, error_rate=0.5)


def test_nothing_feasible_exits_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study_api, "run_scheduled", Scheduled(_Broken(4.0)))
    code, output = _run(CliRunner(), write_spec(tmp_path, **SERIES))
    assert code == Verdict.NONE_FEASIBLE.exit_code == 4, output
    assert "no feasible config: nothing to recommend" in output
    (name,) = _runs(small_spec(tmp_path, **SERIES))
    assert not (tmp_path / "out" / name / "recommended").exists()
    assert "**No feasible config** (exit code 4)" in (tmp_path / "out" / name / "report.md").read_text()
