"""``autotune dashboard`` wraps two optuna-dashboard internals; if a release moves them the command
must stop with a clear message instead of silently showing infeasible trials as best."""

from __future__ import annotations

from pathlib import Path

import optuna
import optuna_dashboard._app as app
import pytest
from click.testing import CliRunner

from autotune.cli import main
from autotune.cli._dashboard import feasibility_patches


def test_missing_internal_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delattr(app, "get_pareto_front_trials")
    optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/x.db")  # a storage that exists
    result = CliRunner().invoke(main, ["dashboard", "--storage", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 1
    assert "Error: autotune dashboard wraps optuna-dashboard's optuna_dashboard._app.get_pareto_front_trials" in \
        result.output
    assert "pip install 'optuna-dashboard>=0.21,<0.22'" in result.output and "Traceback" not in result.output


def test_changed_signature_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "get_pareto_front_trials", lambda trials, directions, extra=None: [])
    with pytest.raises(Exception, match=r"has get_pareto_front_trials\(trials, directions, extra\)"), \
            feasibility_patches():
        pass


def test_patches_are_undone() -> None:
    before = app.get_pareto_front_trials
    with feasibility_patches():
        assert app.get_pareto_front_trials is not before
    assert app.get_pareto_front_trials is before
