"""``autotune dashboard`` as a reviewer sees it, in a real headless browser (Debian's chromium,
driven by Playwright): a finished study with feasible and infeasible trials (the real loop on the
scripted model, tests/_scripted.py). Screenshots go to the test's tmp_path."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from _scripted import scripted_spec_data

from autotune.study import TrialRecord

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"),
]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dash")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(scripted_spec_data(tmp)))
    subprocess.run([sys.executable, str(REPO / "tests" / "_scripted.py"), "study", "start", str(spec)],
                   env=_env(), capture_output=True, text=True, timeout=120, check=True)
    return tmp


@pytest.fixture(scope="module")
def server(study_dir: Path) -> Iterator[str]:
    """``autotune dashboard`` in a subprocess on a free port; yields its base URL."""
    port = _free_port()
    env = {**_env(), "AUTOTUNE_STORAGE": f"sqlite:///{study_dir}/s.db"}
    proc = subprocess.Popen([sys.executable, "-m", "autotune", "dashboard", "--port", str(port),
                             "--artifacts-dir", str(study_dir / "out" / "artifacts")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/studies", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert sync_playwright is not None
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="autotune-chromium-") as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                    viewport={"width": 1400, "height": 1000})
        try:
            yield ctx
        finally:
            ctx.close()


def _facts(study_dir: Path) -> tuple[set[int], set[int]]:
    """(trials on pareto.csv's front, COMPLETE trials that broke a constraint)."""
    with open(study_dir / "out" / "scripted" / "pareto.csv", newline="") as f:
        front = {int(r["trial"]) for r in csv.DictReader(f)}
    study = optuna.load_study(study_name="scripted", storage=f"sqlite:///{study_dir}/s.db")
    infeasible = {t.number for t in study.trials if t.state.name == "COMPLETE"
                  and any(v > 0 for v in t.constraints.values())}
    return front, infeasible


def _marked_best(page: Page) -> set[int]:
    """Trial numbers carrying the "Best Trial" chip in the trial list."""
    lines = [s.strip() for s in page.inner_text("body").splitlines() if s.strip()]
    lines = lines[:next(i for i, s in enumerate(lines) if "(trial_id=" in s)]
    best, current = set(), None
    for s in lines:
        if s.startswith("Trial ") and s[6:].isdigit():
            current = int(s[6:])
        elif s == "Best Trial" and current is not None:
            best.add(current)
    return best


def test_no_infeasible_trial_is_best_and_names_show(server: str, browser: Any, study_dir: Path,
                                                    tmp_path: Path) -> None:
    front, infeasible = _facts(study_dir)
    assert infeasible and front and not front & infeasible
    page = browser.new_page()
    page.goto(f"{server}/dashboard/studies/1/trials")
    page.get_by_text("Trial 0", exact=True).first.wait_for()
    page.screenshot(path=tmp_path / "trials.png")
    assert _marked_best(page) == front  # the dashboard's best trials are pareto.csv's, none infeasible
    page.goto(f"{server}/dashboard/studies/1")
    page.get_by_text("Best Trials").wait_for()
    page.wait_for_timeout(1000)  # plots render
    page.screenshot(path=tmp_path / "study.png", full_page=True)
    text = page.inner_text("body")
    assert "p95 latency (ms)" in text and "CPU limit (cores)" in text
    assert "Objective 0" not in text
    assert "infeasible (broke a constraint)" in text  # the saved constraint-aware chart


def test_trial_page_shows_constraints_and_artifacts_open(server: str, browser: Any, study_dir: Path,
                                                         tmp_path: Path) -> None:
    _, infeasible = _facts(study_dir)
    number = min(infeasible)
    page = browser.new_page()
    page.goto(f"{server}/dashboard/studies/1/trials?numbers={number}")
    page.get_by_text("Artifacts", exact=True).wait_for()
    page.screenshot(path=tmp_path / "infeasible-trial.png")
    text = page.inner_text("body")
    assert f"Trial {number} (trial_id=" in text
    assert "feasible no" in text and "(broken)" in text
    assert "constraint error_rate (≤ 0 is met)" in text and "constraint throughput_ratio (≤ 0 is met)" in text
    links = page.locator("a[download]").evaluate_all(
        "els => Object.fromEntries(els.map(e => [e.getAttribute('download'), e.getAttribute('href')]))")
    assert set(links) == {"destinationrule.yaml", "deployment-patch.yaml", "windows.csv", "latency.html",
                          "proxy.json"}
    manifest = page.request.get(server + links["destinationrule.yaml"])
    assert manifest.ok and "kind: DestinationRule" in manifest.text()
    # The per-window table opens in the dashboard's artifact viewer.
    page.locator("a[download='windows.csv']").locator("xpath=..").get_by_label("show artifact table").click()
    viewer = page.locator("table").filter(has_text="latency_p95_ms").first
    viewer.wait_for()
    page.screenshot(path=tmp_path / "windows-csv.png")
    assert "throughput_ratio" in viewer.inner_text()
    # One row per measurement window: 1 when it broke a constraint in its first (early abort).
    study = optuna.load_study(study_name="scripted", storage=f"sqlite:///{study_dir}/s.db")
    record = TrialRecord.read(study.trials[number])
    assert viewer.locator("tbody tr").count() == len(record.windows) == (1 if record.aborted_after else 3)


def test_study_note_shows_the_pareto_table(server: str, browser: Any, study_dir: Path, tmp_path: Path) -> None:
    front, _ = _facts(study_dir)
    page = browser.new_page()
    page.goto(f"{server}/dashboard/studies/1/note")
    table = page.locator("table").first
    table.wait_for()
    page.screenshot(path=tmp_path / "note.png", full_page=True)
    headers = table.locator("th").all_inner_texts()
    assert headers[:4] == ["trial", "config", "p95 ms", "vs base"] and "p95 ms Δ (CI)" in headers
    shown = {int(r) for r in table.locator("tbody tr td:first-child").all_inner_texts()}
    assert shown == front
    assert "kubectl apply -f" in page.inner_text("body")
