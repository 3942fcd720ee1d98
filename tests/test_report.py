"""What a scheduled job leaves behind: the whole Pareto table in a piped log, and a report whose
numbers are pareto.csv's. The study is run by the real ``autotune study start`` on the scripted
model (tests/_scripted.py), so it has feasible and infeasible trials, drift checks and a confirmation."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from _scripted import scripted_spec_data

REPO = Path(__file__).resolve().parent.parent
HEADERS = ["trial", "config", "p95 ms", "vs base", "CPU limit", "rps", "errors", "confirmed", "p95 ms Δ (CI)"]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "80"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``autotune study start`` with stdout piped; returns (tmp dir, its stdout)."""
    tmp = tmp_path_factory.mktemp("study")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(scripted_spec_data(tmp)))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_scripted.py"), "study", "start", str(spec)],
                          env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc.stdout


def _pareto_rows(tmp: Path) -> list[dict[str, str]]:
    with open(tmp / "out" / "scripted" / "pareto.csv", newline="") as f:
        return list(csv.DictReader(f))


def _pct(value: str) -> str:
    return f"{float(value):+.1f}%"


def _check_whole_table(out: str, rows: list[dict[str, str]]) -> None:
    lines = out.splitlines()
    start = lines.index("Pareto front of scripted (feasible)")
    table = lines[start + 1:start + 3 + len(rows) + 1]
    assert "…" not in "\n".join(table)
    header = table[0]
    for h in HEADERS:
        assert h in header, (h, header)
    body = table[2:]
    for row in rows:
        line = next(x for x in body if x.split()[0] == row["trial"])
        config = "baseline (Istio defaults)" if row["baseline"] == "True" else row["config"]
        expected = [config, f"{float(row['latency_p95_ms']):.2f}", _pct(row["latency_p95_ms_vs_baseline_pct"]),
                    f"{float(row['cpu_reserved_cores']):.2f}", _pct(row["cpu_reserved_cores_vs_baseline_pct"]),
                    f"{float(row['error_rate']):.1%}"]
        if row["latency_p95_ms_ci_low_pct"]:
            expected.append(f"[{_pct(row['latency_p95_ms_ci_low_pct'])}, {_pct(row['latency_p95_ms_ci_high_pct'])}]")
        for cell in expected:
            assert cell in line, (cell, line)


def test_study_start_piped_prints_every_column_whole(finished: tuple[Path, str]) -> None:
    tmp, out = finished
    rows = _pareto_rows(tmp)
    assert len(rows) >= 3 and any(r["confirmed"] == "True" for r in rows)
    _check_whole_table(out, rows)
    knobs = out.split("Which knobs matter (family-wise alpha 0.10", 1)[1].splitlines()
    assert knobs[1].split() == ["parameter", "matters?", "where", "(scenario.metric)", "effect", "size",
                                "/", "p-value"]
    assert next(line for line in knobs if line.startswith("proxy.cpuLimit ")).split()[1:3] == [
        "yes", "steady.cpu_reserved_cores"]
    assert max(len(line) for line in out.splitlines()) > 80  # wider than the 80 columns rich assumes


def test_pareto_format_table_piped_is_whole(finished: tuple[Path, str]) -> None:
    tmp, _ = finished
    proc = subprocess.run([sys.executable, "-m", "autotune", "pareto", "scripted", "--storage",
                           f"sqlite:///{tmp}/s.db", "--format", "table"],
                          env=_env(), capture_output=True, text=True, timeout=60, check=True)
    _check_whole_table(proc.stdout, _pareto_rows(tmp))


def _md_table(md: str, heading: str) -> list[list[str]]:
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[2:]]


def test_report_holds_the_numbers_of_pareto_csv(finished: tuple[Path, str]) -> None:
    tmp, _ = finished
    out = tmp / "out" / "scripted"
    md = (out / "report.md").read_text()
    rows = {r["trial"]: r for r in _pareto_rows(tmp)}
    table = _md_table(md, "Pareto front against the baseline")
    assert [r[0] for r in table] == list(rows)
    for cells in table:
        row = rows[cells[0]]
        assert float(cells[2]) == pytest.approx(float(row["latency_p95_ms"]), abs=0.005)
        assert cells[3] == _pct(row["latency_p95_ms_vs_baseline_pct"])
        assert float(cells[4]) == pytest.approx(float(row["cpu_reserved_cores"]), abs=0.005)
        assert cells[5] == _pct(row["cpu_reserved_cores_vs_baseline_pct"])
    confirmed = _md_table(md, "Confirmation")
    assert confirmed
    for cells in confirmed:
        row = rows[cells[0]]
        assert cells[1] == ("yes" if row["confirmed"] == "True" else "no")
        low, high = row["cpu_reserved_cores_ci_low_pct"], row["cpu_reserved_cores_ci_high_pct"]
        assert cells[3] == f"{_pct(row['cpu_reserved_cores_confirmed_change_pct'])} [{_pct(low)}, {_pct(high)}]"
    drift = _md_table(md, "Baseline drift checks")
    assert len(drift) == 3 and drift[0][2] == "first"  # trial 0, then every 5 trials
    best = next(r for r in rows.values() if r["confirmed"] == "True")
    folder = out / f"trial-{int(best['trial']):03d}"
    assert f"kubectl apply -f {folder / 'destinationrule.yaml'}" in md
    assert f"--type merge --patch-file {folder / 'deployment-patch.yaml'}" in md
    assert (folder / "deployment-patch.yaml").exists()
    knobs = md.split("## Which knobs mattered\n", 1)[1].split("### Ranges explored", 1)[0]
    searched = ["connectionPool.tcp.maxConnections", "connectionPool.http.http1MaxPendingRequests",
                "proxy.cpuLimit"]
    verdicts = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in knobs.splitlines()
                if line.startswith("| ") and " | " in line and not line.startswith("| :")}
    assert set(searched) <= set(verdicts)  # every searched knob has a row
    assert verdicts["proxy.cpuLimit"] == "yes"  # the CPU limit is its own objective
    page = (out / "report.html").read_text()
    assert "<table>" in page and "Plotly.newPlot" in page and 'src="https://cdn' not in page  # plotly.js embedded


def test_report_is_the_study_note_and_the_chart_respects_constraints(finished: tuple[Path, str]) -> None:
    from optuna_dashboard import get_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    tmp, _ = finished
    study = optuna.load_study(study_name="scripted", storage=f"sqlite:///{tmp}/s.db")
    assert get_note(study) == (tmp / "out" / "scripted" / "report.md").read_text()
    assert study.metric_names == ["p95 latency (ms)", "CPU limit (cores)"]
    graphs = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    figure = yaml.safe_load(graphs["autotune-pareto"])  # JSON is YAML
    traces = {t["name"]: t for t in figure["data"]}
    infeasible = {t.number for t in study.trials if t.state.name == "COMPLETE"
                  and any(v > 0 for v in t.constraints.values())}
    assert infeasible
    shown = {int(re.match(r"trial (\d+)", s).group(1)) for s in traces["infeasible (broke a constraint)"]["text"]}
    assert shown == infeasible
    front = {int(re.match(r"trial (\d+)", s).group(1)) for s in traces["feasible Pareto front"]["text"]}
    assert front == {int(r["trial"]) for r in _pareto_rows(tmp)} and not front & infeasible
    assert figure["layout"]["xaxis"]["title"]["text"] == "p95 latency (ms)"
