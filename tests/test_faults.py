"""Faults on the loop side (issue 10): a run killed at each phase, two runs of one study, a locked
database, a signal right after the load, a results folder or storage that cannot be written, and
exceptions anywhere in a trial. Each checks: the trial is recorded with its reason, the target is
back at its baseline, nothing is left running (and no lease held), and the study resumes and
completes its budget with no trial lost or counted twice. Replay target and driver, real SQLite
files; the kill and two-starts tests use real processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from _specs import small_spec, write_spec
from autotune.cli import main
from autotune.errors import FailReason, StorageError, StudyBusy
from autotune.export import pareto_frame, trials_frame
from autotune.load import LoadResult
from autotune.mesh import MeshConfig
from autotune.spec import LoadSpec, StudySpec
from autotune.study import Observer, StudyLease, TrialRecord, counted_trials, make_storage, open_study, run_study
from autotune.study import _storage as storage_mod
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget

RUNNER = Path(__file__).with_name("_replay_run.py")


def _point(config: MeshConfig) -> Point:
    p95 = 4.0 + 1.0 / config.effective_cpu_limit
    return Point(p95 * 0.5, p95, p95 * 1.2, cpu_cores=0.05 * config.effective_cpu_limit)


def _db(tmp_path: Path) -> Path:
    return tmp_path / "s.db"


def _leases(tmp_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(_db(tmp_path)) as conn:
        try:
            return conn.execute("SELECT study, slot, pid FROM autotune_leases").fetchall()
        except sqlite3.OperationalError:  # the table was never made
            return []


def _run(spec: StudySpec, land: Landscape | None = None,
         driver: ReplayDriver | None = None) -> tuple[optuna.Study, ReplayTarget]:
    land = land or (driver.landscape if driver else Landscape.synthetic(_point))
    target = ReplayTarget(land)
    return run_study(spec, None, target, load=driver or ReplayDriver(land)), target


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.read(t) for t in study.get_trials()]


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def _assert_resumes_to_budget(spec: StudySpec, trials_before: int, not_counted: int) -> optuna.Study:
    """Run again: the budget is completed exactly, every trial of before is kept, nothing counted
    twice, every FAIL has a reason, one first baseline, the lease is gone afterwards."""
    study, target = _run(spec)
    total = spec.study.trials
    assert counted_trials(study) == total
    assert len(study.get_trials()) == total + not_counted
    assert trials_before <= len(study.get_trials())
    assert "RUNNING" not in _states(study) and "WAITING" not in _states(study)
    for t, r in zip(study.get_trials(), _records(study), strict=True):
        assert t.state.name == "COMPLETE" or r.fail_reason is not None, t.number
    assert target.closed and target.landscape.applied == MeshConfig()
    assert not _leases(Path(spec.study.storage.removeprefix("sqlite:///")).parent)
    return study


# -- a run killed with SIGKILL (defects 1 and 2) ---------------------------------------------------


def _start_and_kill(spec_path: Path, block_run: int, *args: str) -> None:
    """Start the study in a process, SIGKILL it inside load run ``block_run``, reap it."""
    env = {**os.environ, "REPLAY_BLOCK_RUN": str(block_run)}
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(spec_path), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"LOAD {block_run} "):
            break
    proc.kill()
    proc.wait(10)
    proc.stdout.close()
    assert seen and seen[-1].startswith(f"LOAD {block_run} "), "".join(seen)


def test_a_run_killed_during_the_baseline_leaves_a_study_that_gets_its_baseline(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, **{"study.trials": 3})
    _start_and_kill(spec_path, block_run=1)  # inside the baseline's load
    spec = small_spec(tmp_path, **{"study.trials": 3})
    left = open_study(spec)
    assert _states(left) == ["RUNNING"] and _records(left)[0].baseline
    assert len(_leases(tmp_path)) == 1  # the dead run's lease: taken over at once below
    started = time.monotonic()
    study = _assert_resumes_to_budget(spec, trials_before=1, not_counted=1)
    assert time.monotonic() - started < 10  # no waiting for a heartbeat to go stale
    records = _records(study)
    assert _states(study)[0] == "FAIL" and records[0].fail_reason == FailReason.CRASHED
    assert records[0].fail_message and "killed or crashed" in records[0].fail_message
    assert records[1].baseline and _states(study)[1] == "COMPLETE"  # a new baseline, measured first
    assert sum(r.baseline for r in records) == 2
    frame = pareto_frame(study)
    assert not frame.empty and frame["latency_p95_ms_vs_baseline_pct"].notna().all()
    assert (frame["compared_with_baseline"] == 1).all()


def test_a_crashed_trial_is_recorded_even_when_the_budget_is_used(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, **{"study.trials": 3})
    _start_and_kill(spec_path, block_run=3)  # inside trial 2, the third of the budget
    spec = small_spec(tmp_path, **{"study.trials": 2})  # the re-run finds its budget used
    study, target = _run(spec)
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert _records(study)[2].fail_reason == FailReason.CRASHED
    assert counted_trials(study) == 2 and target.applied == [] and not target.started
    assert not _leases(tmp_path)
    # A trial left running by a run that never took a lease (an older version) is caught too.
    hand = open_study(spec).ask()
    assert _states(open_study(spec))[-1] == "RUNNING"
    _run(spec)
    assert optuna.load_study(study_name="t", storage=spec.study.storage).get_trials()[hand.number].state.name == "FAIL"
    study = _assert_resumes_to_budget(small_spec(tmp_path, **{"study.trials": 3}), 4, not_counted=2)
    assert [r.fail_reason for r in _records(study)][2:4] == [FailReason.CRASHED] * 2


# -- two starts of one study (defect 3) ------------------------------------------------------------


def test_two_starts_at_once_one_runs_the_other_names_it(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, **{"study.trials": 4})
    env = {**os.environ, "REPLAY_SLEEP_S": "0.3"}
    procs = [subprocess.Popen([sys.executable, str(RUNNER), str(spec_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "Pareto front of t" in outs[winner]
    error = [line for line in outs[loser].splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in outs[loser], outs[loser]
    assert f"study 't' is already running: pid {procs[winner].pid} on " in error[0]
    assert "LOAD" not in outs[loser]  # it measured nothing
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{_db(tmp_path)}")
    assert counted_trials(study) == 4 and len(study.get_trials()) == 4
    configs = [r.config for r in _records(study)]
    assert len(set(configs)) == 4  # no config measured twice
    assert not _leases(tmp_path)


def test_a_lease_is_refused_while_live_and_taken_over_when_stale(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{_db(tmp_path)}")
    with StudyLease(storage, "t"):
        with pytest.raises(StudyBusy, match=rf"already running: pid {os.getpid()} on \S+ since "):
            StudyLease(storage, "t").acquire()
        StudyLease(storage, "other").acquire()  # another study: its own lease
    with sqlite3.connect(_db(tmp_path)) as conn:  # a holder on another host, heartbeat fresh
        conn.execute("UPDATE autotune_leases SET host='elsewhere', heartbeat=? WHERE study='other'",
                     (time.time(),))
    with pytest.raises(StudyBusy, match=r"pid .* on elsewhere since"):
        StudyLease(storage, "other").acquire()
    with sqlite3.connect(_db(tmp_path)) as conn:  # ... then silent for longer than STALE_S
        conn.execute("UPDATE autotune_leases SET heartbeat=heartbeat-1000 WHERE study='other'")
    lease = StudyLease(storage, "other")
    with lease:
        assert lease.live_tokens() == {lease.token}
    assert not _leases(tmp_path)


# -- a locked database (defect 4) ------------------------------------------------------------------


class _Lock:
    """A real SQLite write lock (BEGIN EXCLUSIVE) held by another connection for ``hold_s``."""

    def __init__(self, db: Path, hold_s: float) -> None:
        self.db, self.hold_s = db, hold_s
        self.taken = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        self.taken.set()
        time.sleep(self.hold_s)
        conn.execute("COMMIT")
        conn.close()

    def __enter__(self) -> _Lock:
        self.thread.start()
        assert self.taken.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()


class _LockAfterLoad(ReplayDriver):
    """Takes the database's write lock as load run ``run`` ends (before the trial is recorded)."""

    def __init__(self, land: Landscape, db: Path, run: int, hold_s: float) -> None:
        super().__init__(land)
        self.db, self.run_no, self.hold_s = db, run, hold_s
        self.lock: _Lock | None = None

    def run(self, url: str, load: LoadSpec, **kw: Any) -> list[LoadResult]:
        results = super().run(url, load, **kw)
        if self.landscape.runs == self.run_no:
            self.lock = _Lock(self.db, self.hold_s).__enter__()
        return results


@pytest.fixture
def short_bounds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(storage_mod, "BUSY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(storage_mod, "RETRY_S", 1.5)
    yield


@pytest.mark.usefixtures("short_bounds")
def test_a_lock_shorter_than_the_retry_bound_loses_nothing(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 3})
    driver = _LockAfterLoad(Landscape.synthetic(_point), _db(tmp_path), run=2, hold_s=0.8)
    study, target = _run(spec, driver=driver)
    assert driver.lock is not None
    driver.lock.__exit__()
    assert _states(study) == ["COMPLETE"] * 3 and counted_trials(study) == 3
    assert _records(study)[1].metrics["latency_p95_ms"] == _point(target.applied[1]).latency_p95_ms


@pytest.mark.usefixtures("short_bounds")
def test_a_lock_past_the_bound_is_one_error_the_values_are_logged_and_the_study_resumes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 3})
    driver = _LockAfterLoad(Landscape.synthetic(_point), _db(tmp_path), run=2, hold_s=3.0)
    target = ReplayTarget(driver.landscape)
    with pytest.raises(StorageError) as err:
        run_study(spec, None, target, load=driver)
    assert driver.lock is not None
    driver.lock.__exit__()
    message = str(err.value)
    assert "\n" not in message and "database is locked" in message and "1.5 s" in message
    assert "record the measurement of trial 1" in message
    lost = [r.getMessage() for r in caplog.records if "measured but not recorded" in r.getMessage()]
    p95 = _point(target.applied[1]).latency_p95_ms
    assert len(lost) == 1 and f'"latency_p95_ms": {p95}' in lost[0]
    assert target.closed and target.landscape.applied == MeshConfig() and not driver.active
    study = _assert_resumes_to_budget(spec, trials_before=2, not_counted=1)
    assert _records(study)[1].fail_reason in (FailReason.STORAGE, FailReason.CRASHED)


def _replayed_cli(monkeypatch: pytest.MonkeyPatch, driver_for: Any = None) -> None:
    def replayed(spec: StudySpec, observer: Observer | None = None) -> optuna.Study:
        land = Landscape.synthetic(_point)
        driver = driver_for(land) if driver_for else ReplayDriver(land)
        return run_study(spec, observer, ReplayTarget(land), load=driver)

    monkeypatch.setattr("autotune.study.run_study", replayed)  # the CLI imports it lazily


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _one_error(out: str) -> str:
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.mark.usefixtures("short_bounds")
def test_the_cli_reports_a_locked_database_in_one_line_mid_run_and_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_path = write_spec(tmp_path, **{"study.trials": 3})
    drivers: list[_LockAfterLoad] = []

    def locking(land: Landscape) -> ReplayDriver:
        drivers.append(_LockAfterLoad(land, _db(tmp_path), run=2, hold_s=3.0))
        return drivers[-1]

    _replayed_cli(monkeypatch, locking)
    code, out = _cli("study", "start", str(spec_path))
    drivers[0].lock.__exit__() if drivers[0].lock else None
    assert code == 1 and "database is locked" in _one_error(out)
    with _Lock(_db(tmp_path), hold_s=2.5):  # held while the next run starts
        code, out = _cli("study", "start", str(spec_path))
    assert code == 1 and "database is locked" in _one_error(out)
    _replayed_cli(monkeypatch)
    code, out = _cli("study", "start", str(spec_path))
    assert code == 0, out
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{_db(tmp_path)}")
    assert counted_trials(study) == 3 and len(study.get_trials()) == 4


# -- a signal right after the load, and any exception in a trial (defects 5 and 7) -----------------


class _Raising(ReplayTarget):
    """Raises ``exc`` at ``phase`` of the ``n``-th trial (0 = the baseline)."""

    def __init__(self, land: Landscape, phase: str, exc: BaseException, n: int) -> None:
        super().__init__(land)
        self.phase, self.exc, self.n, self.seen = phase, exc, n, -1

    def apply(self, config: MeshConfig) -> None:
        self.seen += 1
        self._maybe("apply")
        super().apply(config)

    def wait_ready(self, timeout_s: float) -> None:
        self._maybe("wait_ready")
        super().wait_ready(timeout_s)

    def end_window(self) -> Any:
        usage = super().end_window()
        self._maybe("end_window")
        return usage

    def _maybe(self, phase: str) -> None:
        if phase == self.phase and self.seen == self.n:
            raise self.exc


@pytest.mark.parametrize(("phase", "exc", "reason"), [
    ("apply", KeyboardInterrupt(), FailReason.INTERRUPTED),
    ("wait_ready", SystemExit(143), FailReason.INTERRUPTED),
    ("end_window", RuntimeError("a bug"), FailReason.INTERNAL),
    ("apply", ValueError("another bug"), FailReason.INTERNAL),
])
def test_every_exception_in_a_trial_is_recorded_restored_and_raised(
        tmp_path: Path, phase: str, exc: BaseException, reason: FailReason) -> None:
    spec = small_spec(tmp_path, **{"study.trials": 3})
    land = Landscape.synthetic(_point)
    target, driver = _Raising(land, phase, exc, n=1), ReplayDriver(land)
    with pytest.raises(type(exc)):
        run_study(spec, None, target, load=driver)
    assert target.closed and target.restores >= 1 and land.applied == MeshConfig()
    assert not driver.active and not target.window_open and not _leases(tmp_path)
    study = open_study(spec)
    assert _states(study) == ["COMPLETE", "FAIL"]
    rec = _records(study)[1]
    assert rec.fail_reason == reason and rec.fail_message
    assert type(exc).__name__ in rec.fail_message or reason == FailReason.INTERRUPTED
    _assert_resumes_to_budget(spec, trials_before=2, not_counted=1)


@pytest.mark.parametrize("when", ["after-load", "mid-record", "before-tell"])
def test_a_signal_right_after_the_load_ends_the_trial_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """SIGINT (a real signal, the default handler) as the load of trial 1 ends, half-way through
    writing its record, or just before it is told COMPLETE."""
    spec = small_spec(tmp_path, **{"study.trials": 3})
    land = Landscape.synthetic(_point)
    fired: list[str] = []

    def fire(what: str) -> None:
        if not fired and land.runs == 2:
            fired.append(what)
            signal.raise_signal(signal.SIGINT)

    class Driver(ReplayDriver):
        def run(self, url: str, load: LoadSpec, **kw: Any) -> list[LoadResult]:
            out = super().run(url, load, **kw)
            if when == "after-load":
                fire("load")
            return out

    set_attr, tell = optuna.trial.Trial.set_user_attr, optuna.Study.tell

    def set_user_attr(self: optuna.trial.Trial, key: str, value: Any) -> None:
        if when == "mid-record" and key == "latency_p95_ms":
            fire(key)
        set_attr(self, key, value)

    def patched_tell(self: optuna.Study, *a: Any, **kw: Any) -> Any:
        if when == "before-tell":
            fire("tell")
        return tell(self, *a, **kw)

    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", set_user_attr)
    monkeypatch.setattr(optuna.Study, "tell", patched_tell)
    target, driver = ReplayTarget(land), Driver(land)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, None, target, load=driver)
    assert fired
    assert target.closed and land.applied == MeshConfig() and not driver.active
    study = open_study(spec)
    assert _states(study) == ["COMPLETE", "FAIL"]
    assert _records(study)[1].fail_reason == FailReason.INTERRUPTED
    row = trials_frame(study).iloc[1]
    assert row["state"] == "FAIL" and str(row["fail_reason"]).startswith("interrupted")
    monkeypatch.undo()
    _assert_resumes_to_budget(spec, trials_before=2, not_counted=1)


# -- results folder and storage that cannot be written (defect 6) ----------------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write, root included (immutable attribute; mode 0500 as a user)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)


def test_a_read_only_results_folder_still_prints_the_table_then_one_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_only_dir: Path) -> None:
    _replayed_cli(monkeypatch)
    # With the artifact store inside it (the default), the run stops before anything is created.
    spec_path = write_spec(tmp_path, **{"study.trials": 3, "study.resultsDir": str(read_only_dir)})
    code, out = _cli("study", "start", str(spec_path))
    assert code == 1 and "cannot create the trials' artifact store" in _one_error(out)
    assert not _db(tmp_path).exists()
    # With the store elsewhere, the study runs; only the export fails, after the table.
    spec_path = write_spec(tmp_path, **{"study.trials": 3, "study.resultsDir": str(read_only_dir),
                                        "study.artifactsDir": str(tmp_path / "artifacts")})
    code, out = _cli("study", "start", str(spec_path))
    assert code == 1
    assert "Pareto front of t" in out
    error = _one_error(out)
    assert f"could not write the results to {read_only_dir}/t" in error
    assert "ermission denied" in error or "not permitted" in error
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{_db(tmp_path)}")
    assert counted_trials(study) == 3  # the study itself is complete
    code, out = _cli("export", "t", "--storage", f"sqlite:///{_db(tmp_path)}", "--out",
                     str(tmp_path / "elsewhere"))
    assert code == 0 and (tmp_path / "elsewhere" / "trials.csv").is_file()


def test_bad_storage_paths_are_one_line_errors_and_reading_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _replayed_cli(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    spec_path = write_spec(tmp_path)
    code, out = _cli("study", "start", str(spec_path), "--storage", f"sqlite:///{a_file}/s.db")
    # Checked when the spec is read (study.storage), before anything is created.
    assert code == 1 and _one_error(out) and f"cannot create the folder of the study storage {a_file}/s.db" in out
    a_dir = tmp_path / "dir.db"
    a_dir.mkdir()
    code, out = _cli("study", "start", str(spec_path), "--storage", f"sqlite:///{a_dir}")
    assert code == 1 and _one_error(out) and f"the study storage {a_dir} is a folder" in out
    missing = tmp_path / "nothing" / "here.db"
    for args in (["study", "list"], ["pareto", "t"], ["export", "t", "--out", str(tmp_path / "x")],
                 ["dashboard", "--port", "1"]):  # refused before any server starts
        code, out = _cli(*args, "--storage", f"sqlite:///{missing}")
        assert code == 1 and f"no study storage at {missing}" in _one_error(out), args
    assert not missing.parent.exists() and not (tmp_path / "x").exists()
