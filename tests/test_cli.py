"""The CLI as a user drives it: in-process through click's runner, and the dashboard as a process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from _specs import write_spec
from autotune.cli import main
from autotune.spec import StudySpec
from autotune.study import Observer, run_study
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_bad_spec_is_an_error_message_not_a_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("study: {name: x}\nparameters:\n  proxy.concurrency: {low: 0, high: 2}\n")
    code, out = _run("study", "start", str(spec))
    assert code == 1
    assert out.startswith("Error: invalid study spec") and 'parameters["proxy.concurrency"].low' in out
    assert "Traceback" not in out


def test_unknown_study_and_bad_set(tmp_path: Path) -> None:
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/x.db")
    code, out = _run("pareto", "nope", "--storage", f"sqlite:///{tmp_path}/x.db")
    assert code == 1 and "no study named 'nope'" in out
    code, out = _run("trial", "run", str(write_spec(tmp_path)), "--set", "proxy.cpuLimit=lots")
    assert code == 1 and "--set 'proxy.cpuLimit=lots'" in out


def _replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``study start`` runs its study on the replay target and driver (no Envoy, no Locust)."""
    land = Landscape.synthetic(lambda c: Point(2.0, 4.0 + 1 / c.effective_cpu_limit, 6.0,
                                                cpu_cores=0.05 * c.effective_cpu_limit))

    def replayed(spec: StudySpec, observer: Observer | None = None) -> optuna.Study:
        return run_study(spec, observer, ReplayTarget(land), load=ReplayDriver(land))

    monkeypatch.setattr("autotune.study.run_study", replayed)  # the CLI imports it lazily


def test_study_start_then_list_pareto_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _replayed(monkeypatch)
    spec = write_spec(tmp_path, **{"study.trials": 3})
    storage = f"sqlite:///{tmp_path}/s.db"
    code, out = _run("study", "start", str(spec), "--study-name", "cli", "--duration", "1.5")
    assert code == 0, out
    assert "Pareto front of cli" in out and "baseline" in out
    assert "✓ trial 0 baseline: p95 ms 4.50, CPU used 0.10" in out
    assert "results: " in out and (tmp_path / "out" / "cli" / "pareto.csv").is_file()
    code, out = _run("study", "list", "--storage", storage)
    assert code == 0 and "cli" in out
    code, out = _run("pareto", "cli", "--storage", storage, "--format", "json")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["feasible"] for r in rows)
    assert all(r["latency_p95_ms"] > 0 and r["cpu_cores"] > 0 for r in rows)
    code, out = _run("pareto", "cli", "--storage", storage, "--format", "csv")
    assert out.splitlines()[0].startswith("trial,state,baseline,feasible")
    code, out = _run("export", "cli", "--storage", storage, "--out", str(tmp_path / "exp"))
    assert code == 0
    assert (tmp_path / "exp" / "trials.csv").read_text().count("\n") == 4  # header + 3 trials
    assert list((tmp_path / "exp").glob("trial-*/destinationrule.yaml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_serves_the_storage_without_the_url_in_argv(tmp_path: Path) -> None:
    secret_url = f"sqlite:///{tmp_path}/dash.db"
    optuna.create_study(study_name="seen-by-dashboard", storage=secret_url)
    port = _free_port()
    env = {**os.environ, "AUTOTUNE_STORAGE": secret_url}
    proc = subprocess.Popen([sys.executable, "-m", "autotune", "dashboard", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    names = [x["study_name"] for x in json.loads(r.read())["study_summaries"]]
                    assert names == ["seen-by-dashboard"]
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.3)
        assert secret_url not in " ".join(proc.args)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(10)
        out = proc.stdout.read().decode() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    assert str(tmp_path) in out  # the storage it serves is named (without a password)


@pytest.mark.slow
def test_ctrl_c_restores_and_the_same_command_resumes(tmp_path: Path) -> None:
    """A real SIGINT to `autotune study start` during a load window: exit 130, nothing left
    running (the leak check), the study resumable by running the same command again."""
    import signal

    spec = write_spec(tmp_path, **{"study.trials": 2, "timing.window": 4})
    cmd = [sys.executable, "-m", "autotune", "study", "start", str(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    assert proc.stdout is not None
    lines = []
    for raw in proc.stdout:  # wait until the baseline is done and trial 1 is under load
        lines.append(raw.decode())
        if "trial 0 baseline" in lines[-1]:
            break
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.stdout.read().decode()
    proc.stdout.close()
    assert proc.wait(30) == 130, out
    assert "Interrupted" in out and "run the same command again" in out
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/s.db")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL"]
    code, out = _run("study", "start", str(spec))
    assert code == 0, out
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/s.db")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "COMPLETE"]
