"""Everything the terminal shows: one rich console, live study progress, the Pareto table."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from autotune.mesh import MeshConfig

if TYPE_CHECKING:  # autotune.study and .export load Optuna, pandas and SciPy: not before a spec has passed
    from autotune.export import TextTable
    from autotune.study import TrialOutcome


def _labels() -> dict[str, str]:
    from autotune.study import METRIC_LABELS

    return METRIC_LABELS


console = Console(stderr=False, highlight=False)


def setup_logging(verbose: bool = False) -> None:
    """Route logging through the console (Optuna is configured by ``quiet_optuna`` once loaded)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
                        force=True)


def quiet_optuna() -> None:
    """Optuna's own per-trial lines are replaced by ours; call it before using Optuna (importing it
    takes ~0.5 s, so the CLI does so only once a spec has passed)."""
    import optuna

    # Optuna flags features we rely on (heartbeats, constraints) as experimental; users need not see it.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class RichObserver:
    """Live progress: trial i/N, the phase of the current trial (apply, ready, warm-up, measure)
    and one line per finished trial with the best feasible result so far."""

    def __init__(self, objectives: Sequence[str]) -> None:
        self.objectives = list(objectives)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=console, transient=False,
            disable=not console.is_terminal,  # a job log gets the per-trial lines, not cropped bars
        )
        self.study_task: TaskID | None = None
        self.phase_task: TaskID | None = None
        self.label = ""

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def study_started(self, name: str, done: int, total: int) -> None:
        self.study_task = self.progress.add_task(f"study {name}", total=total, completed=done,
                                                 info=f"{done}/{total} trials")
        self.phase_task = self.progress.add_task("trial", total=1.0, info="")

    def trial_started(self, number: int, index: int, total: int, config: MeshConfig,
                      baseline: bool, stage: str = "trial") -> None:
        self.label = "baseline (Istio defaults)" if baseline else config.describe()
        if self.phase_task is not None:
            self.progress.reset(self.phase_task, total=1.0, completed=0, description=f"{stage} {index}/{total}",
                                info=escape(self.label))

    def phase(self, name: str, fraction: float) -> None:
        """The bar shows the load's warm-up and measurement window; apply/ready show as text."""
        if self.phase_task is not None:
            self.progress.update(self.phase_task, completed=max(0.0, min(1.0, fraction)),
                                 info=f"{name} · {escape(self.label)}")

    def trial_finished(self, outcome: TrialOutcome, front: list[TrialOutcome]) -> None:
        tag = "baseline" if outcome.baseline else outcome.config.describe()
        if outcome.state == "FAIL":
            self.progress.console.print(f"[red]✗ trial {outcome.number}[/] {escape(tag)}: "
                                        f"{escape(outcome.reason)}")
        else:
            m = outcome.metrics
            parts = [f"{_labels().get(k, k)} {_fmt(m.get(k))}" for k in self.objectives]
            parts.append(f"{_fmt(m.get('achieved_rps'), 0)} rps, errors {m.get('error_rate', 0):.1%}")
            mark = "[green]✓[/]" if outcome.feasible else "[yellow]infeasible[/]"
            extra = f" ({'; '.join(outcome.violations)})" if outcome.violations else ""
            self.progress.console.print(f"{mark} trial {outcome.number} {escape(tag)}: "
                                        f"{', '.join(parts)}{escape(extra)}")
        if self.study_task is not None:
            if outcome.counts:
                self.progress.advance(self.study_task)
            task = self.progress.tasks[self.study_task]
            self.progress.update(self.study_task, info=f"{int(task.completed)}/{int(task.total or 0)} trials · "
                                 f"{self._front_text(front)}")

    def _front_text(self, front: list[TrialOutcome]) -> str:
        """The current best: the feasible Pareto configs, e.g. ``front: #0 6.98/0.09, #4 7.10/0.05``."""
        if not front:
            return "no feasible config yet"
        cells = [f"#{t.number} " + "/".join(_fmt(t.metrics.get(k)) for k in self.objectives) for t in front[:4]]
        more = f" +{len(front) - 4}" if len(front) > 4 else ""
        units = "/".join(_labels().get(k, k) for k in self.objectives)
        return f"front ({units}): {', '.join(cells)}{more}"


def print_table(table: TextTable) -> None:
    """Print a table with every cell whole: in a terminal as a rich table whose cells fold onto
    more lines when narrow; elsewhere (a pipe, a Kubernetes Job's log) as plain padded columns,
    however wide, since there is no terminal width to fit."""
    if not console.is_terminal:
        console.print(table.plain(), markup=False, highlight=False, soft_wrap=True)
        return
    out = Table(title=escape(table.title))
    for header, right in zip(table.headers, table.right, strict=True):
        out.add_column(escape(header), justify="right" if right else "left", overflow="fold")
    for row in table.rows:
        out.add_row(*map(escape, row))
    console.print(out)


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    """One measurement, metric by metric (``autotune trial run``)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value, 3))
    return table
