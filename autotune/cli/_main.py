"""The ``autotune`` command: parses, calls the library, prints. No logic lives here."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.markup import escape

from autotune.cli._console import RichObserver, console, metrics_table, print_table, quiet_optuna, setup_logging
from autotune.errors import AutotuneError
from autotune.mesh import NO_LIMIT, PARAMETERS, MeshConfig, ParamValue, parse_cpu
from autotune.spec import DEFAULT_STORAGE, StudySpec, load_spec, parse_duration

if TYPE_CHECKING:  # Optuna, pandas and the study loop load only once a spec has passed (fast errors)
    import optuna

F = TypeVar("F", bound=Callable[..., Any])

storage_option = click.option(
    "--storage", envvar="AUTOTUNE_STORAGE", default=DEFAULT_STORAGE, show_default=True,
    help="Optuna storage URL (SQLAlchemy). Prefer the AUTOTUNE_STORAGE variable for URLs with "
         "passwords; 'env:NAME' reads it from variable NAME.",
)


class _Group(click.Group):
    """Turns autotune's own errors into ``Error: …`` with exit code 1 and no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AutotuneError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Tune an Istio mesh's connection pool and sidecar settings by Bayesian search."""
    setup_logging(verbose)


@main.group()
def study() -> None:
    """Run and list studies."""


def _overrides(spec: StudySpec, **opts: Any) -> StudySpec:
    keys = {"study_name": "study.name", "trials": "study.trials", "storage": "study.storage",
            "sampler": "study.sampler", "seed": "study.seed", "duration": "timing.window",
            "warmup": "timing.warmup", "results_dir": "study.results_dir",
            "artifacts_dir": "study.artifacts_dir"}
    changes = {keys[k]: v for k, v in opts.items() if v is not None}
    return spec.with_overrides(**changes) if changes else spec


def _spec_options(f: F) -> F:
    for opt in reversed([
        click.option("--study-name", help="Override study.name."),
        click.option("--trials", type=int, help="Override the trial budget (baseline included)."),
        click.option("--storage", envvar="AUTOTUNE_STORAGE", help="Override study.storage."),
        click.option("--sampler", type=click.Choice(["tpe", "nsga2", "random", "gp"])),
        click.option("--seed", type=int),
        click.option("--duration", type=float, help="Override timing.window (one measurement window), seconds."),
        click.option("--warmup", type=float, help="Override timing.warmup, seconds."),
        click.option("--results-dir", help="Where trials/<name>/ exports go."),
        click.option("--artifacts-dir", help="Override study.artifactsDir (the trials' artifact store)."),
    ]):
        f = opt(f)
    return f


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@study.command("start")
@click.argument("spec_path", type=click.Path(dir_okay=False, path_type=Path))
@_spec_options
def study_start(spec_path: Path, **opts: Any) -> None:
    """Start or continue the study in SPEC_PATH; ends with the Pareto table."""
    spec = _overrides(load_spec(spec_path), **opts)
    from autotune.export import export_study, results_dir
    from autotune.study import redact, run_study

    quiet_optuna()
    objectives = [o.metric for o in spec.objectives]
    console.print(f"study [bold]{spec.study.name}[/] · storage {redact(spec.study.storage)} · "
                  f"sampler {spec.study.sampler} · load {spec.load.users} users × "
                  f"{spec.load.per_user_rate:g} rps, {spec.timing.warmup:g}s warm-up + "
                  f"{spec.measurement.repeats}×{spec.timing.window:g}s windows")
    # A CronJob's pod is stopped with SIGTERM: treat it like Ctrl-C, so the baseline is restored.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with RichObserver(objectives) as observer:
            st = run_study(spec, observer)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] The target is back at its baseline; run the same "
                      "command again to continue the study.")
        sys.exit(130)
    _print_pareto(st)  # before the export: a results folder that cannot be written loses no table
    _print_knobs(st)
    export_study(st, results_dir(spec))
    console.print(f"results: {results_dir(spec)}/ (trials.csv, pareto.csv, manifests)")


@study.command("run-scheduled")
@click.argument("spec_path", type=click.Path(dir_okay=False, path_type=Path))
@_spec_options
def study_run_scheduled(spec_path: Path, **opts: Any) -> None:
    """One scheduled run of the series SPEC_PATH names (what the CronJob runs): a new study
    <name>-<UTC time> that re-checks the previous recommendation, warm-starts from the previous
    run, stops when the front is flat and says what changed. Exit code: 0 recommendation
    unchanged, 3 changed, 4 no feasible config (1 error, 130 interrupted)."""
    spec = _overrides(load_spec(spec_path), **opts)
    from autotune.export import export_study, results_dir
    from autotune.study import redact, run_scheduled

    quiet_optuna()
    console.print(f"scheduled run of [bold]{spec.study.name}[/] · storage {redact(spec.study.storage)} · "
                  f"budget {spec.study.trials} trials")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with RichObserver([o.metric for o in spec.objectives]) as observer:
            result = run_scheduled(spec, observer)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] The target is back at its baseline; the next run starts "
                      "a new study and re-checks the last finished run's recommendation.")
        sys.exit(130)
    _print_pareto(result.study)
    out = results_dir(spec.with_overrides(**{"study.name": result.study.study_name}))
    export_study(result.study, out)
    console.print(f"results: {out}/ (report.md, outcome.json, recommended/, trials.csv, pareto.csv)")
    for line in result.outcome.lines():  # the job's last log lines
        console.print(escape(line), highlight=False)
    sys.exit(result.outcome.verdict.exit_code)


@study.command("list")
@storage_option
def study_list(storage: str) -> None:
    """List the studies in the storage: plain studies, and each series' scheduled runs in order
    with their outcome."""
    import optuna

    from autotune.study import (
        make_storage,
        redact,
        resolve_url,
        run_info,
        run_verdict,
        storage_errors,
        study_objectives,
    )

    quiet_optuna()
    with storage_errors(resolve_url(storage), "read"):
        summaries = optuna.get_all_study_summaries(make_storage(storage, create=False))
    from rich.table import Table

    def order(s: optuna.study.StudySummary) -> tuple[str, int, str]:
        info = run_info(s)  # a series' runs after its plain study, by start time
        return (info.series, 1, info.started) if info else (s.study_name, 0, "")

    table = Table(title=f"studies in {redact(storage)}")
    for col in ("study", "series", "trials", "objectives", "started", "outcome"):
        table.add_column(col, no_wrap=col in ("study", "outcome"))  # a run's name stays whole
    for s in sorted(summaries, key=order):
        info = run_info(s)
        verdict = run_verdict(s)
        table.add_row(s.study_name, info.series if info else "-", str(s.n_trials),
                      ", ".join(study_objectives(s) or []), str(s.datetime_start or "-"),
                      verdict.value if verdict else "-")
    console.print(table)


def _load(name: str, storage: str) -> optuna.Study:
    import optuna

    from autotune.study import make_storage, redact, resolve_url, storage_errors

    quiet_optuna()
    try:
        with storage_errors(resolve_url(storage), "read"):
            return optuna.load_study(study_name=name, storage=make_storage(storage, create=False))
    except KeyError:
        raise AutotuneError(f"no study named {name!r} in {redact(storage)}; "
                            "see 'autotune study list'") from None


def _print_pareto(st: optuna.Study) -> None:
    from autotune.export import front_with_baseline, pareto_text_table, scenario_text_tables, study_scenarios
    from autotune.study import study_objectives

    objectives = study_objectives(st) or []
    frame = front_with_baseline(st)
    if frame.empty:
        console.print("[yellow]No feasible trial yet:[/] every measured config broke a constraint "
                      "or failed. See trials.csv for the reasons.")
        return
    print_table(pareto_text_table(frame, objectives, f"Pareto front of {st.study_name} (feasible)"))
    for table in scenario_text_tables(frame, study_scenarios(st)):
        print_table(table)


def _print_knobs(st: optuna.Study) -> None:
    """The verdict on each searched knob (stored at the end of the study), as one table."""
    from autotune.export import knob_effects_table
    from autotune.study import knob_effects_of

    effects = knob_effects_of(st)
    if effects is not None:
        print_table(knob_effects_table(effects))


@main.command()
@click.argument("name")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def pareto(name: str, storage: str, fmt: str) -> None:
    """Show the feasible Pareto-optimal configs of study NAME."""
    from autotune.export import pareto_frame

    st = _load(name, storage)
    if fmt == "table":
        _print_pareto(st)
        _print_knobs(st)
    elif fmt == "csv":
        click.echo(pareto_frame(st).to_csv(index=False), nl=False)
    else:
        click.echo(pareto_frame(st).to_json(orient="records", indent=2))


@main.command()
@click.argument("name")
@storage_option
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
def export(name: str, storage: str, out: Path) -> None:
    """Write trials.csv, pareto.csv and per-Pareto-config manifests of study NAME to --out."""
    from autotune.export import export_study

    result = export_study(_load(name, storage), out)
    console.print(f"wrote {result.trials_csv}, {result.pareto_csv} and "
                  f"{len(result.manifest_dirs)} manifest folder(s)")


@main.command()
@storage_option
@click.option("--port", default=8080, show_default=True)
@click.option("--artifacts-dir", envvar="AUTOTUNE_ARTIFACTS_DIR", default="trials/artifacts", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The trials' artifact store (a spec's study.artifactsDir, default <resultsDir>/artifacts).")
def dashboard(storage: str, port: int, artifacts_dir: Path) -> None:
    """Serve optuna-dashboard for the storage on 127.0.0.1 (the URL stays out of argv and logs).
    Only feasible trials are marked best; each trial lists its constraints and artifacts. A
    SQLite storage that does not exist is an error (a mistyped path never creates an empty one)."""
    from autotune.cli._dashboard import serve
    from autotune.study import make_storage, redact, resolve_url, storage_errors

    quiet_optuna()
    with storage_errors(resolve_url(storage), "read"):
        opened = make_storage(storage, create=False)
    console.print(f"optuna-dashboard on http://127.0.0.1:{port}/ for {redact(storage)} (Ctrl-C stops)")
    serve(opened, "127.0.0.1", port, artifacts_dir)


@main.group()
def trial() -> None:
    """Measure single configs."""


def _parse_sets(values: tuple[str, ...]) -> MeshConfig:
    params: dict[str, ParamValue] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or key not in PARAMETERS:
            raise AutotuneError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(PARAMETERS)}")
        info = PARAMETERS[key]
        if info.kind == "choice" or (key == "proxy.cpuLimit" and raw == NO_LIMIT):
            if info.choices and raw not in info.choices:
                raise AutotuneError(f"--set {item!r}: must be one of {', '.join(info.choices)}")
            params[key] = raw
            continue
        try:
            value: int | float = (parse_cpu(raw) if info.kind == "cpu"
                                  else round(parse_duration(raw) * 1000) if info.kind == "duration"
                                  else int(raw))
        except ValueError as exc:
            raise AutotuneError(f"--set {item!r}: {exc}") from None
        if not info.minimum <= value <= info.maximum:
            raise AutotuneError(f"--set {item!r}: must be between {info.minimum:g} and {info.maximum:g}")
        params[key] = value
    return MeshConfig.from_params(params)


@trial.command("run")
@click.argument("spec_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A setting by its Istio name, e.g. proxy.cpuLimit=500m. Unset ones keep Istio's default.")
@click.option("--duration", type=float)
@click.option("--warmup", type=float)
def trial_run(spec_path: Path, sets: tuple[str, ...], duration: float | None,
              warmup: float | None) -> None:
    """Measure one config once under the spec's load (e.g. to check the baseline)."""
    spec = _overrides(load_spec(spec_path), duration=duration, warmup=warmup)
    config = _parse_sets(sets)
    from autotune.study import run_single

    quiet_optuna()
    with RichObserver([o.metric for o in spec.objectives]) as observer:
        observer.study_started("single trial", 0, 1)
        observer.trial_started(0, 1, 1, config, not sets)
        measured = run_single(spec, config, observer)
    console.print(metrics_table(measured.metrics, f"trial: {config.describe()}"))


def run() -> None:
    """Console-script entry point."""
    main(prog_name="autotune")
