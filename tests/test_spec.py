"""Bad specs fail before anything runs, naming the file, the field path and the rule broken.

A spec is valid by construction (``StudySpec.model_validate`` applies every rule), and every family
of bad spec a user writes — storage URL, encoding, size, durations, locustfile, cross-field rules,
YAML syntax — is refused by the CLI with one message, no traceback, and nothing created.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from _specs import small_spec
from autotune.errors import SpecError
from autotune.spec import MAX_FILE_BYTES, StudySpec, load_spec, parse_duration, parse_spec
from autotune.spec import _models as models_module
from autotune.spec import _storage_url as storage_module

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
study:
  name: t
sidecar:
  cpuRequest: 50m
parameters:
  connectionPool.tcp.maxConnections: {low: 1, high: 64, log: true}
  proxy.cpuLimit: {low: 50m, high: "2", step: 50m}
"""

RECORDER = "import autotune.load.locustfile  # noqa: F401\n"


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


def _base(tmp_path: Path) -> dict[str, Any]:
    """A valid spec whose storage and results live under ``tmp_path`` (to check nothing is created)."""
    return {
        "study": {"name": "t", "storage": f"sqlite:///{tmp_path}/s.db", "resultsDir": str(tmp_path / "out")},
        "sidecar": {"cpuRequest": "100m"},
        "parameters": {
            "connectionPool.tcp.maxConnections": {"low": 1, "high": 64, "log": True},
            "proxy.cpuLimit": {"low": "100m", "high": "2", "step": "100m"},
        },
    }


def _k8s_target() -> dict[str, Any]:
    return {"kind": "kubernetes", "namespace": "staging", "deployment": "web", "destinationRule": "backend",
            "host": "backend.staging.svc.cluster.local", "serviceUrl": "http://web:8080",
            "prometheus": {"url": "http://prom:9090", "scrapeInterval": "15s"}}


# -- the shipped specs and the typed model --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "search-spaces").glob("*.yaml")))
def test_shipped_specs_are_valid(name: str) -> None:
    spec = load_spec(REPO / "search-spaces" / name)
    assert spec.search_space()
    assert spec.timing.window >= spec.timing.warmup > 0


def test_defaults_follow_the_issue() -> None:
    spec = load_spec(REPO / "search-spaces" / "local-demo.yaml")
    assert spec.study.storage == "sqlite:///trials/autotune.db"
    assert spec.constraints.max_error_rate == 0.01 and spec.constraints.min_throughput_ratio == 0.95
    by_name = {p.name: p for p in spec.search_space()}
    assert by_name["proxy.cpuLimit"].low == pytest.approx(0.02)  # "20m" parsed to cores
    assert spec.load.offered_rps == pytest.approx(300)
    assert (spec.timing.warmup, spec.timing.window) == (4.0, 8.0)


def test_good_spec_parses_cpu_quantities(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GOOD))
    cpu = {p.name: p for p in spec.search_space()}["proxy.cpuLimit"]
    assert (cpu.low, cpu.high, cpu.step) == (0.05, 2.0, 0.05)
    assert [o.metric for o in spec.objectives] == ["latency_p95_ms", "cpu_used_cores"]


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"connectionPool.tcp.maxConnectionz": {"low": 1, "high": 2}},
         'parameters["connectionPool.tcp.maxConnectionz"]: unknown parameter'),
        ({"connectionPool.tcp.maxConnections": {"low": 64, "high": 1}},
         'parameters["connectionPool.tcp.maxConnections"]: low <= high must hold, got low=64, high=1'),
        ({"connectionPool.tcp.maxConnections": {"low": 0, "high": 64}},
         'parameters["connectionPool.tcp.maxConnections"].low: must be >= 1 (Istio treats 0 as unset'),
    ],
    ids=["unknown", "low>high", "zero"],
)
def test_model_validate_alone_applies_the_parameter_rules(params: dict[str, Any], expected: str) -> None:
    """Not only parse_spec: the model refuses what Optuna or Istio would choke on."""
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate({"study": {"name": "t"}, "parameters": params})
    assert expected in str(info.value)


def test_search_space_is_computed_once_at_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(_write(tmp_path, GOOD))

    def boom(*_a: Any) -> Any:
        raise AssertionError("search_space() re-parsed the ranges")

    monkeypatch.setattr(models_module, "_search_param", boom)
    first = spec.search_space()
    assert [p.name for p in first] == ["connectionPool.tcp.maxConnections", "proxy.cpuLimit"]
    first.clear()  # callers get a copy: the stored space cannot be changed through it
    assert len(spec.search_space()) == 2


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: d.setdefault("load", {}).update(duration="20s"), "load.duration: moved to timing.window"),
        (lambda d: d.setdefault("load", {}).update(warmup=5), "load.warmup: moved to timing.warmup"),
        (lambda d: d.update(target={"kind": "local", "readyTimeout": "30s"}),
         "target.readyTimeout: moved to timing.proxyStartTimeout"),
        (lambda d: d.update(target={**_k8s_target(), "settle": "10s"}), "target.settle: moved to timing.xdsPush"),
        (lambda d: d.update(target={**_k8s_target(), "rolloutTimeout": "10min"}),
         "target.rolloutTimeout: moved to timing.rolloutTimeout"),
        (lambda d: d.update(timing={"duration": 20}), "timing.duration: is called timing.window"),
    ],
    ids=["load.duration", "load.warmup", "local.readyTimeout", "k8s.settle", "k8s.rolloutTimeout", "timing.duration"],
)
def test_old_timing_names_say_where_the_field_moved(tmp_path: Path, edit: Callable[[dict[str, Any]], None],
                                                    expected: str) -> None:
    data = _base(tmp_path)
    edit(data)
    message = _error(tmp_path, yaml.safe_dump(data))
    assert expected in message and "Extra inputs" not in message


def test_timing_reaches_the_targets(tmp_path: Path) -> None:
    from autotune.targets import make_target

    spec = small_spec(tmp_path, **{"timing.proxyStartTimeout": "12s"})
    assert make_target(spec).timing.proxy_start_timeout == 12.0  # type: ignore[attr-defined]


# -- field rules (unchanged behaviour, messages with path and rule) --------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
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
        (GOOD + "load:\n  ratePerUser: 5\n  targetRps: 100\n", "give either ratePerUser or targetRps"),
        (GOOD + "objectives: [latency_p42_ms]\n", "objectives[0].metric: unknown metric 'latency_p42_ms'"),
        (GOOD + "study2: {}\n", "study2: Extra inputs are not permitted"),
        (GOOD.replace("name: t", "name: 'bad name/'"), "study.name: String should match pattern"),
        (GOOD + "target: {kind: kubernetes}\n", "target.namespace: Field required"),
        (GOOD.replace("cpuRequest: 50m", "memoryLimit: lots"), "sidecar.memoryLimit: a memory quantity"),
    ],
    ids=["negative", "above-int32", "cpu-unparsable", "cpu-precision", "log+step", "float-for-int", "users-0",
         "rate-twice", "unknown-metric", "unknown-section", "study-name", "k8s-fields", "memory"],
)
def test_bad_spec_names_field_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


def test_duplicated_key_names_both_lines(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "parameters:\n  proxy.concurrency: {low: 1, high: 2}\n")
    assert "duplicated key 'parameters' (first at line 5)" in message and "line 8" in message


def test_duplicated_parameter_is_caught(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "  proxy.cpuLimit: {low: 1, high: 2}\n")
    assert "duplicated key 'proxy.cpuLimit'" in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("low: 1, high: 64", "low: 0, high: 4294967295")
                     .replace("low: 50m", "low: nope") + "load: {users: 0}\n")
    assert message.count("\n  - ") == 4


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "nope.yaml")
    assert "a study spec is a mapping" in _error(tmp_path, "")


# -- family: storage URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,expected",
    [
        ("postgres://u:pw@db/autotune", "SQLAlchemy calls it 'postgresql://'"),
        ("redis://localhost:6379/0", "unsupported storage 'redis://': Optuna stores studies in SQLite"),
        ("trials/autotune.db", "is a path, not a URL; a SQLite file is written sqlite:///trials/autotune.db"),
        ("sqlite://relative/path.db", "names a host ('relative')"),
        ("sqlite://", "an in-memory SQLite database forgets the study"),
        ("env:$AUTOTUNE_DB", "'$' is never part of it), got '$AUTOTUNE_DB'; write env:AUTOTUNE_DB"),
        ("env:1DB", "env:NAME needs a variable name"),
        ("postgresql+nosuchdriver://u@db/x", "unknown postgresql driver 'nosuchdriver'"),
    ],
    ids=["postgres", "redis", "bare-path", "sqlite-relative", "in-memory", "env-dollar", "env-digit", "driver"],
)
def test_storage_url_is_checked_when_the_spec_is_read(tmp_path: Path, url: str, expected: str) -> None:
    data = _base(tmp_path)
    data["study"]["storage"] = url
    message = _error(tmp_path, yaml.safe_dump(data))
    assert "study.storage: " in message and expected in message
    assert "pw@" not in message or "pw" not in url  # a password is never echoed


def test_storage_driver_must_be_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = storage_module.importlib.util.find_spec
    monkeypatch.setattr(storage_module.importlib.util, "find_spec",
                        lambda name: None if name == "psycopg2" else real(name))
    data = _base(tmp_path)
    data["study"]["storage"] = "postgresql://u@db/autotune"
    assert "needs the Python module 'psycopg2', which is not installed (pip install psycopg2-binary)" in \
        _error(tmp_path, yaml.safe_dump(data))


def test_sqlite_path_that_is_a_directory_or_under_a_file(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["study"]["storage"] = f"sqlite:///{tmp_path}"
    assert f"the study storage {tmp_path} is a folder; name a database file in it" in \
        _error(tmp_path, yaml.safe_dump(data))
    (tmp_path / "afile").write_text("x")
    data["study"]["storage"] = f"sqlite:///{tmp_path}/afile/s.db"
    assert f"cannot create the folder of the study storage {tmp_path}/afile/s.db: {tmp_path}/afile is a file" \
        in _error(tmp_path, yaml.safe_dump(data))


def test_storage_from_the_environment_is_checked_without_echoing_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTUNE_TEST_DB", "postgres://admin:hunter2@db/autotune")
    data = _base(tmp_path)
    data["study"]["storage"] = "env:AUTOTUNE_TEST_DB"
    message = _error(tmp_path, yaml.safe_dump(data))
    assert "(from the environment variable AUTOTUNE_TEST_DB)" in message and "postgresql://" in message
    assert "hunter2" not in message
    monkeypatch.delenv("AUTOTUNE_TEST_DB")  # unset: reported when the storage is opened, not here
    assert load_spec(tmp_path / "spec.yaml").study.storage == "env:AUTOTUNE_TEST_DB"


# -- family: encoding, control characters, size, YAML syntax --------------------------------------


@pytest.mark.parametrize(
    "content,expected",
    [
        (GOOD.replace("name: t", "name: t # café").encode("latin-1"),
         "not UTF-8 text: byte 0xe9 at line 2, column 16 (in Latin-1 that byte is 'é')"),
        (GOOD.encode("utf-16"), "is UTF-16 (little-endian byte-order mark, as PowerShell"),
        (GOOD.encode("utf-16-le"), "holds NUL bytes (UTF-16 without a byte-order mark"),
        (gzip.compress(GOOD.encode()), "is gzip-compressed; decompress it first"),
        (GOOD.replace("name: t", "name: \x1b[32mt\x1b[0m").encode(),
         "line 2, column 9: control character U+001B (ESC: a terminal colour escape"),
    ],
    ids=["latin-1", "utf-16-bom", "utf-16-no-bom", "gzip", "colour-escape"],
)
def test_files_that_are_not_utf8_text_are_named(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_utf8_with_a_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_spec(path).study.name == "t"


def test_size_limit_is_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD + "# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(SpecError, match=r"the file is 1\.0 MiB; a spec may be at most 1 MiB"):
        load_spec(path)


def test_a_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(tmp_path)


def test_unclosed_quote_is_reported_where_it_opens(tmp_path: Path) -> None:
    # No other quote after it: PyYAML reports the end of the file, its context the opening quote.
    message = _error(tmp_path, GOOD.replace("name: t", "name: 't") + "load:\n  users: 4\n")
    assert "YAML syntax at line 2, column 9: this quote is never closed (the file ends at line 10)" in message
    # A later quote closes it: the string runs on over several lines until something breaks.
    message = _error(tmp_path, GOOD.replace("name: t", 'name: "t'))
    assert "YAML syntax at line 2, column 9: this quote is never closed on its line (the string runs on to " \
           "line 7)" in message


def test_unclosed_bracket_is_reported_where_it_opens(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "objectives: [latency_p95_ms, cpu_cores\nload:\n  users: 4\n")
    assert "YAML syntax at line 8, column 13 (parsing a flow sequence)" in message


# -- family: durations -----------------------------------------------------------------------------


def test_duration_units() -> None:
    assert [parse_duration(v) for v in (30, 1.5, "500ms", "30s", "10min", "1h", "2.5 s")] == \
        [30.0, 1.5, 0.5, 30.0, 600.0, 3600.0, 2.5]


@pytest.mark.parametrize(
    "timing,expected",
    [
        ({"warmup": "600m"}, "timing.warmup: '600m' is ambiguous: 'm' means millicores for CPU in this file; "
                             "write 600ms or 600min"),
        ({"window": "10 minutes"}, "timing.window: unknown unit 'minutes'"),
        ({"warmup": "2h"}, "timing.warmup: must be at most 10min, got 2h"),
        ({"window": 7200}, "timing.window: must be at most 1h, got 2h (a bare number is seconds)"),
        ({"readyTimeout": "0s"}, "timing.readyTimeout: must be greater than 0"),
        ({"settle": -1}, "timing.settle: a duration must be a finite number of seconds >= 0"),
        ({"window": "ten"}, "timing.window: a duration is a number of seconds or a string with a unit"),
    ],
    ids=["m-ambiguous", "unknown-unit", "warmup-bound", "window-bound", "zero-timeout", "negative", "garbage"],
)
def test_bad_durations(tmp_path: Path, timing: dict[str, Any], expected: str) -> None:
    data = _base(tmp_path)
    data["timing"] = timing
    assert expected in _error(tmp_path, yaml.safe_dump(data))


# -- family: the locustfile ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("missing.py", None, "missing.py does not exist (a relative path is relative to the spec file)"),
        ("load.txt", RECORDER, "is not a Python file (.py)"),
        ("plain.py", "from locust import HttpUser\n", "does not import autotune.load.locustfile"),
        ("broken.py", RECORDER + "def f(:\n", "is not valid Python at line 2"),
    ],
    ids=["missing", "not-py", "no-recorder", "syntax"],
)
def test_locustfile_is_checked_relative_to_the_spec(tmp_path: Path, name: str, content: str | None,
                                                    expected: str) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    if content is not None:
        (specs / name).write_text(content)
    data = _base(tmp_path)
    data["load"] = {"locustfile": name}
    path = specs / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert f"load.locustfile: {specs / name}" in str(info.value) and expected in str(info.value)


def test_a_good_locustfile_next_to_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mine.py").write_text(RECORDER + "from locust import FastHttpUser\n")
    data = _base(tmp_path)
    data["load"] = {"locustfile": "mine.py"}
    (specs / "spec.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # resolved against the spec's folder, not the working directory
    assert load_spec(specs / "spec.yaml").locustfile_path() == specs / "mine.py"


# -- family: cross-field rules ---------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return edit


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_set("sidecar/cpuRequest", "200m"),
         'sidecar.cpuRequest: must be <= the lowest proxy.cpuLimit searched (parameters["proxy.cpuLimit"].low = '
         "100m): Kubernetes refuses a request above its limit; got 200m"),
        (lambda d: d.update(sidecar={"cpuRequest": "3"}, parameters={"proxy.concurrency": {"low": 1, "high": 2}}),
         "sidecar.cpuRequest: must be <= Istio's default CPU limit 2 (proxy.cpuLimit is not searched)"),
        (_set("sidecar", {"memoryRequest": "2Gi", "memoryLimit": "1Gi"}),
         "sidecar: memoryRequest <= memoryLimit must hold (Kubernetes refuses a request above its limit)"),
        (_set("parameters/proxy.concurrency", {"low": 1, "high": 4, "step": 8}),
         'parameters["proxy.concurrency"].step: step <= high - low must hold'),
        (_set("parameters/proxy.concurrency", {"low": 1, "high": 10, "step": 4}),
         'parameters["proxy.concurrency"].high: high - low must be a multiple of step (Optuna would silently '
         "lower high to 9)"),
        (_set("parameters/proxy.cpuLimit", {"low": "100m", "high": "1", "step": "250m"}),
         'parameters["proxy.cpuLimit"].high: high - low must be a multiple of step'),
        (_set("objectives", ["latency_p95_ms", "cpu_cores", "latency_p95_ms"]),
         "objectives[2]: latency_p95_ms is already objectives[0]; each metric may be an objective once"),
        (_set("target", {**_k8s_target(), "prometheus": {"url": "http://p:9090", "tokenFile": "/t",
                                                         "tokenEnv": "TOKEN"}}),
         "target.prometheus: give either tokenFile or tokenEnv, not both"),
        (_set("target", {**_k8s_target(), "prometheus": {"url": "http://p:9090", "tokenEnv": "$TOKEN"}}),
         "target.prometheus.tokenEnv: String should match pattern"),
        (lambda d: d.update(target=_k8s_target(), timing={"window": "30s"}),
         "timing.window: must span at least 4 Prometheus scrape intervals "
         "(target.prometheus.scrapeInterval = 15s), i.e. >= 1min; got 30s"),
    ],
    ids=["cpu-request>limit", "cpu-request>default-limit", "memory-request>limit",
         "step>range", "step-int-multiple", "step-cpu-multiple",
         "objective-twice", "two-token-sources", "token-env-dollar", "window<4-scrapes"],
)
def test_cross_field_rules(tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str) -> None:
    data = copy.deepcopy(_base(tmp_path))
    edit(data)
    assert expected in _error(tmp_path, yaml.safe_dump(data))


def test_kubernetes_quantities_as_numbers(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["sidecar"] = {"cpuRequest": 1, "memoryRequest": 134217728, "memoryLimit": 1073741824}
    data["parameters"]["proxy.cpuLimit"] = {"low": 1, "high": 2}
    spec = load_spec(_write(tmp_path, yaml.safe_dump(data)))
    assert spec.sidecar.cpu_request == "1" and spec.sidecar.cpu_request_cores == 1.0
    assert spec.sidecar.memory_limit == "1073741824"
    data["sidecar"] = {"cpuRequest": 0.05, "memoryLimit": True}
    message = _error(tmp_path, yaml.safe_dump(data))
    assert "sidecar.memoryLimit: a memory quantity looks like" in message  # a bool is no quantity


# -- the CLI: one message, no traceback, nothing created, no heavy import -------------------------

#: One bad spec per family, with the field path (or line) and the rule the message must hold.
CLI_CASES: dict[str, tuple[Callable[[Path], bytes], str, str]] = {
    "storage": (lambda t: _dump(t, _set("study/storage", "postgres://u@db/x")), "study.storage",
                "SQLAlchemy calls it 'postgresql://'"),
    "encoding": (lambda t: _dump(t).decode().replace("name: t", "name: té").encode("latin-1"), "line 2",
                 "not UTF-8 text"),
    "gzip": (lambda t: gzip.compress(_dump(t)), "spec.yaml", "gzip-compressed"),
    "size": (lambda t: _dump(t) + b"#" * MAX_FILE_BYTES, "spec.yaml", "may be at most 1 MiB"),
    "duration": (lambda t: _dump(t, _set("timing/warmup", "600m")), "timing.warmup", "write 600ms or 600min"),
    "locustfile": (lambda t: _dump(t, _set("load/locustfile", "nope.py")), "load.locustfile", "does not exist"),
    "cross-field": (lambda t: _dump(t, _set("sidecar/cpuRequest", "1")), "sidecar.cpuRequest",
                    "Kubernetes refuses a request above its limit"),
    "window": (lambda t: _dump(t, lambda d: d.update(target=_k8s_target(), timing={"window": 20})),
               "timing.window", "at least 4 Prometheus scrape intervals"),
    "yaml-quote": (lambda t: _dump(t).replace(b"name: t", b"name: 't"), "line 2", "quote is never closed"),
    "moved-field": (lambda t: _dump(t, _set("load/duration", 20)), "load.duration", "moved to timing.window"),
}


def _dump(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    data = _base(tmp_path)
    if edit is not None:
        edit(data)
    return yaml.safe_dump(data, sort_keys=False).encode()


@pytest.mark.parametrize("family", sorted(CLI_CASES))
def test_cli_refuses_each_family_with_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   family: str) -> None:
    from autotune.cli import main

    make, where, rule = CLI_CASES[family]
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(make(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["study", "start", str(spec)])
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.output.startswith(f"Error: invalid study spec {spec}:")
    assert where in result.output and rule in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no database, no results, no trials/


HEAVY = ("optuna", "pandas", "scipy", "plotly", "kubernetes", "sqlalchemy", "locust")


def test_rejecting_a_spec_imports_nothing_heavy_and_starts_nothing(tmp_path: Path) -> None:
    """The real command in a fresh interpreter: exit 1, no traceback, and none of the slow imports."""
    spec = tmp_path / "bad.yaml"
    spec.write_bytes(CLI_CASES["storage"][0](tmp_path))
    probe = ("import json, sys\nfrom autotune.cli import main\n"
             "try:\n    main(['study', 'start', sys.argv[1]], prog_name='autotune')\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", probe, str(spec)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 1, "heavy": []}, done.stdout
    assert "Traceback" not in done.stderr and "SQLAlchemy calls it 'postgresql://'" in done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_parse_spec_and_with_overrides_keep_the_rules(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    assert spec.with_overrides(**{"timing.window": 3}).timing.window == 3.0
    with pytest.raises(SpecError, match=r"timing\.window: must be greater than 0"):
        spec.with_overrides(**{"timing.window": 0})
    with pytest.raises(SpecError, match=r"\(top level\): a study spec is a mapping"):
        parse_spec([1, 2])
