"""Noise control in the study loop, on the real local target: repeated windows, the drift guard,
and confirmation of the Pareto front."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from _specs import small_spec
from autotune.export import pareto_frame
from autotune.mesh import MeshConfig
from autotune.study import confirm_front, counted_trials, open_study, run_single, run_study
from autotune.targets.local import LocalTarget

pytestmark = pytest.mark.slow


def test_repeated_windows_are_aggregated_by_the_median(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"measurement.repeats": 3, "measurement.maxRepeats": 3,
                                   "load.duration": 1.5})
    m = run_single(spec, MeshConfig())
    assert len(m.windows) == 3 and m.metrics["windows"] == 3
    p95s = [w["latency_p95_ms"] for w in m.windows]
    assert m.metrics["latency_p95_ms"] == pytest.approx(float(np.median(p95s)))
    assert m.metrics["requests"] == pytest.approx(sum(w["requests"] for w in m.windows))
    assert m.spread["latency_p95_ms"] == pytest.approx(np.std(p95s, ddof=1) / np.mean(p95s))
    assert all(w["window_s"] == pytest.approx(1.5, abs=0.1) for w in m.windows)


class _NoisyNeighbour(LocalTarget):
    """After its first trials, something else takes the machine: the proxy gets 5% of a core,
    whatever its config says. A real, physical shift of the same config's latency."""

    def __init__(self, *args: Any, shift_after: int) -> None:
        super().__init__(*args)
        self.applies = 0
        self.shift_after = shift_after

    def apply(self, config: MeshConfig) -> None:
        super().apply(config)
        self.applies += 1
        if self.applies > self.shift_after and self.cgroup is not None:
            self.cgroup.set_quota(0.05)


def test_drift_of_the_baseline_is_detected_and_reported(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 3, "measurement.driftEvery": 1,
                                   "load.users": 20, "load.ratePerUser": 15})
    # applies: start() baseline, trial 0 (baseline), trial 1, then the shift
    target = _NoisyNeighbour(spec.target, spec.service, shift_after=3)
    with caplog.at_level(logging.WARNING, logger="autotune.study"):
        study = run_study(spec, target=target)
    trials = study.get_trials()
    checks = [t for t in trials if t.user_attrs.get("drift_check")]
    assert checks, [t.user_attrs.get("baseline") for t in trials]
    assert counted_trials(study) == 3  # drift checks do not use up the budget
    shifted = [t for t in checks if t.state == TrialState.COMPLETE]
    assert shifted and shifted[0].user_attrs["drift_pct"] > 100 * spec.measurement.drift_threshold
    assert any("baseline drift" in r.getMessage() for r in caplog.records)
    frame = pareto_frame(study)
    for _, row in frame.iterrows():  # each config is compared with its nearest baseline
        nearest = min((t.number for t in trials if t.user_attrs.get("baseline")
                       and t.state == TrialState.COMPLETE), key=lambda n: (abs(n - row["trial"]), n))
        assert row["compared_with_baseline"] == nearest


def _recorded(study: optuna.Study, config: MeshConfig, p95: float, baseline: bool = False) -> None:
    """A trial as the search recorded it (one noisy window), without running it again."""
    values = [p95, config.effective_cpu_limit]
    attrs = {"config": config.to_params(), "baseline": baseline, "feasible": True,
             "latency_p95_ms": p95, "cpu_reserved_cores": config.effective_cpu_limit}
    study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))


def test_confirmation_keeps_real_gains_and_drops_lucky_ones(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"objectives": ["latency_p95_ms", "cpu_reserved_cores"],
                                   "measurement.confirmRounds": 3, "measurement.confidence": 0.99,
                                   "load.duration": 1.5})
    study = open_study(spec)
    _recorded(study, MeshConfig(), p95=5.0, baseline=True)
    # Looked 60 % faster in its one window, but maxRetries changes nothing on this path: luck.
    lucky = MeshConfig(max_retries=1000)
    _recorded(study, lucky, p95=2.0)
    # A quarter of the CPU limit, same latency: a real gain in the second objective.
    cheaper = MeshConfig(cpu_limit=0.5)
    _recorded(study, cheaper, p95=5.1)
    target = LocalTarget(spec.target, spec.service)
    with target:
        result = confirm_front(study, spec, target)
    assert result is not None
    by_trial = result["results"]
    assert by_trial["1"]["confirmed"] is False
    assert by_trial["1"]["reason"] == "no objective improved beyond its confidence interval"
    assert by_trial["2"]["confirmed"] is True
    assert by_trial["2"]["changes"]["cpu_reserved_cores"]["mean_pct"] == pytest.approx(-75.0)
    assert len(result["baseline"]["latency_p95_ms"]) == 3  # A B1 B2, three rounds
    frame = pareto_frame(study).set_index("trial")
    assert frame.loc[1, "confirmed"] == False  # noqa: E712 - pandas bool
    assert frame.loc[2, "confirmed"] == True  # noqa: E712
    assert frame.loc[2, "latency_p95_ms_ci_low_pct"] <= frame.loc[2, "latency_p95_ms_ci_high_pct"]
    # Running it again on the same front does not measure again.
    with LocalTarget(spec.target, spec.service) as again:
        assert confirm_front(study, spec, again) == study.user_attrs["confirmation"]
