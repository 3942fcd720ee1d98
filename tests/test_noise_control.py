"""Confirmation of the Pareto front on the real local target: a real gain holds, a lucky window
does not. The decisions themselves are tested on the replay driver (``test_loop.py``) and on
synthetic runs (``test_confirm.py``)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from _specs import small_spec
from autotune.export import pareto_frame
from autotune.mesh import MeshConfig
from autotune.study import TrialRecord, confirm_front, confirmation_of, open_study
from autotune.targets.local import LocalTarget

pytestmark = pytest.mark.slow


def _recorded(study: optuna.Study, config: MeshConfig, p95: float, baseline: bool = False) -> None:
    """A trial as the search recorded it (one noisy window), without running it again."""
    values = [p95, config.effective_cpu_limit]
    rec = TrialRecord(config=config, baseline=baseline,
                      metrics={"latency_p95_ms": p95, "cpu_reserved_cores": config.effective_cpu_limit})
    study.add_trial(optuna.trial.create_trial(values=values, user_attrs=rec.user_attrs(),
                                              constraints={"error_rate": -0.01, "throughput_ratio": -0.05}))


def test_confirmation_keeps_real_gains_and_drops_lucky_ones(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"objectives": ["latency_p95_ms", "cpu_reserved_cores"],
                                   "measurement.confirmRounds": 3, "measurement.confidence": 0.99,
                                   "timing.window": 1.5})
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
    by_trial = result.results
    assert by_trial[1].confirmed is False
    assert by_trial[1].reason == "no objective improved beyond its confidence interval"
    assert by_trial[2].confirmed is True
    assert by_trial[2].changes["cpu_reserved_cores"].mean_pct == pytest.approx(-75.0)
    assert len(result.baseline["latency_p95_ms"]) == 3  # A B1 B2, three rounds
    frame = pareto_frame(study).set_index("trial")
    assert frame.loc[1, "confirmed"] == False  # noqa: E712 - pandas bool
    assert frame.loc[2, "confirmed"] == True  # noqa: E712
    assert frame.loc[2, "latency_p95_ms_ci_low_pct"] <= frame.loc[2, "latency_p95_ms_ci_high_pct"]
    # Running it again on the same front does not measure again.
    with LocalTarget(spec.target, spec.service) as again:
        assert confirm_front(study, spec, again) == confirmation_of(study)
