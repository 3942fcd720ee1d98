"""Bad specs fail before anything runs, naming the file, the field path and the rule broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.errors import SpecError
from autotune.spec import load_spec

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
study:
  name: t
parameters:
  connectionPool.tcp.maxConnections: {low: 1, high: 64, log: true}
  proxy.cpuLimit: {low: 50m, high: "2", step: 50m}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message  # every error names the file
    return message


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "search-spaces").glob("*.yaml")))
def test_shipped_specs_are_valid(name: str) -> None:
    spec = load_spec(REPO / "search-spaces" / name)
    assert spec.search_space()


def test_defaults_follow_the_issue() -> None:
    spec = load_spec(REPO / "search-spaces" / "local-demo.yaml")
    assert spec.study.storage == "sqlite:///trials/autotune.db"
    assert spec.constraints.max_error_rate == 0.01 and spec.constraints.min_throughput_ratio == 0.95
    by_name = {p.name: p for p in spec.search_space()}
    assert by_name["proxy.cpuLimit"].low == pytest.approx(0.02)  # "20m" parsed to cores
    assert spec.load.offered_rps == pytest.approx(300)


def test_good_spec_parses_cpu_quantities(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GOOD))
    cpu = {p.name: p for p in spec.search_space()}["proxy.cpuLimit"]
    assert (cpu.low, cpu.high, cpu.step) == (0.05, 2.0, 0.05)
    assert [o.metric for o in spec.objectives] == ["latency_p95_ms", "cpu_cores"]


@pytest.mark.parametrize(
    "text,expected",
    [
        (GOOD + "  connectionPool.tcp.maxConnectionz: {low: 1, high: 2}\n",
         'parameters["connectionPool.tcp.maxConnectionz"]: unknown parameter'),
        (GOOD.replace("low: 1, high: 64", "low: 64, high: 1"),
         'parameters["connectionPool.tcp.maxConnections"]: low <= high must hold, got low=64, high=1'),
        (GOOD.replace("low: 1, high: 64", "low: 0, high: 64"),
         'parameters["connectionPool.tcp.maxConnections"].low: must be >= 1 (Istio treats 0 as unset'),
        (GOOD.replace("low: 1, high: 64", "low: -5, high: 64"),
         'parameters["connectionPool.tcp.maxConnections"].low: must be >= 1'),
        (GOOD.replace("low: 1, high: 64", "low: 1, high: 4294967295"),
         'parameters["connectionPool.tcp.maxConnections"].high: must be <= 2147483647'),
        (GOOD.replace("low: 50m", "low: 50x"),
         'parameters["proxy.cpuLimit"].low: a CPU quantity must be cores'),
        (GOOD.replace("low: 50m", "low: 0.0005"),
         'parameters["proxy.cpuLimit"].low: Kubernetes CPU precision is 1m'),
        (GOOD.replace("{low: 1, high: 64, log: true}", "{low: 1, high: 64, log: true, step: 2}"),
         "log and step cannot be combined"),
        (GOOD.replace("low: 1, high: 64", "low: 1.5, high: 64"),
         'parameters["connectionPool.tcp.maxConnections"].low: must be a whole number'),
        (GOOD + "load:\n  users: 0\n", "load.users: Input should be greater than or equal to 1"),
        (GOOD + "load:\n  duration: ten\n", "load.duration: Value error, a duration is"),
        (GOOD + "load:\n  ratePerUser: 5\n  targetRps: 100\n", "give either ratePerUser or targetRps"),
        (GOOD + "objectives: [latency_p42_ms]\n", "objectives[0].metric: Input should be"),
        (GOOD + "study2: {}\n", "study2: Extra inputs are not permitted"),
        (GOOD.replace("name: t", "name: 'bad name/'"), "study.name: String should match pattern"),
        (GOOD + "target: {kind: kubernetes}\n", "target.kubernetes.namespace: Field required"),
        (GOOD + "sidecar: {memoryLimit: lots}\n", "sidecar.memoryLimit: Value error, a memory quantity"),
    ],
    ids=["unknown-param", "low>high", "zero", "negative", "above-int32", "cpu-unparsable",
         "cpu-precision", "log+step", "float-for-int", "users-0", "duration", "rate-twice",
         "unknown-metric", "unknown-section", "study-name", "k8s-fields", "memory"],
)
def test_bad_spec_names_field_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


def test_duplicated_key_names_both_lines(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "parameters:\n  proxy.concurrency: {low: 1, high: 2}\n")
    assert "duplicated key 'parameters' (first at line 3)" in message and "line 6" in message


def test_duplicated_parameter_is_caught(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "  proxy.cpuLimit: {low: 1, high: 2}\n")
    assert "duplicated key 'proxy.cpuLimit'" in message


def test_yaml_syntax_error_gives_its_line(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "load:\n  users: [1, 2\n")
    assert "YAML syntax at line" in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("low: 1, high: 64", "low: 0, high: 4294967295")
                     .replace("low: 50m", "low: nope"))
    assert message.count("\n  - ") == 3


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "nope.yaml")
    assert "a study spec is a mapping" in _error(tmp_path, "")
