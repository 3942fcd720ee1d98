"""``autotune dashboard``: optuna-dashboard, in-process, made to respect the study's constraints.

Why the wrapping: Optuna 5's ``Trial.set_constraint(name, value)`` stores one trial system
attribute per constraint, ``constraints:<name>``; optuna-dashboard 0.21 reads only the older
single attribute ``constraints`` (a list) when it serializes a trial, so every trial reaches the
browser with ``constraints: []`` and counts as feasible; and its Pareto front ("Best Trial") is
computed on every COMPLETE trial, constraints or not. Here, while the server runs:

* the best trials are the Pareto front of the *feasible* COMPLETE trials that are not baseline
  drift checks (the same rule as ``autotune pareto``), computed by optuna-dashboard's own function
  on that subset;
* each trial is serialized with ``constraints`` as the list the dashboard expects, built from the
  ``constraints:<name>`` attributes in a stable order: the names of ``CONSTRAINT_NAMES`` first,
  in that order, then any other name alphabetically. The dashboard's plots then grey out
  infeasible trials. As its trial page shows no constraints, each one is also listed, first among
  the user attributes, as ``constraint <name> (≤ 0 is met)``, with ``feasible``.

Nothing is written to the storage. The wrapped internals are checked before the server starts;
if a release moved them, the command stops with a message instead of showing wrong fronts.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from autotune.errors import AutotuneError
from autotune.study import CONSTRAINT_NAMES, TrialRecord, is_feasible

logger = logging.getLogger(__name__)

#: The optuna-dashboard releases whose internals this module wraps (also pinned in pyproject.toml).
SUPPORTED_DASHBOARD = ">=0.21,<0.22"
_PREFIX = "constraints:"
#: (module, attribute, parameter names) of each internal wrapped.
_INTERNALS = (
    ("optuna_dashboard._app", "get_pareto_front_trials", ("trials", "directions")),
    ("optuna_dashboard._serializer", "serialize_frozen_trial", ("study_id", "trial", "study_system_attrs")),
)


def named_constraints(trial: FrozenTrial) -> list[tuple[str, float]]:
    """The trial's constraints (Optuna's ``constraints:<name>``) as ``(name, value)``, in the order
    the dashboard gets them: ``CONSTRAINT_NAMES`` order, then other names alphabetically."""
    values = trial.constraints
    known = [n for n in CONSTRAINT_NAMES if n in values]
    return [(n, float(values[n])) for n in [*known, *sorted(set(values) - set(known))]]


def constraint_list(trial: FrozenTrial) -> list[float]:
    """The constraint values as the list optuna-dashboard reads (empty when none was stored,
    e.g. the trial failed before it was measured)."""
    return [v for _, v in named_constraints(trial)]


def counts_for_front(trial: FrozenTrial) -> bool:
    """May be on the dashboard's front: feasible (COMPLETE, constraints stored and each ≤ 0) and not
    a baseline drift check — the rule of ``pareto_trials``, so the dashboard's best are ``autotune pareto``'s."""
    return is_feasible(trial) and not TrialRecord.read(trial).drift_check


def _internal(module: str, name: str, params: Sequence[str]) -> Callable[..., Any]:
    """The wrapped function, checked to exist with the parameters this module passes."""
    try:
        fn = getattr(importlib.import_module(module), name)
        found = tuple(inspect.signature(fn).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        found = None
        fn = None
    if fn is None or found != tuple(params):
        import optuna_dashboard

        has = "no such function" if found is None else f"{name}({', '.join(found)})"
        raise AutotuneError(
            f"autotune dashboard wraps optuna-dashboard's {module}.{name}({', '.join(params)}) to show "
            f"feasibility, but optuna-dashboard {optuna_dashboard.__version__} has {has}; "
            f"install a supported release: pip install 'optuna-dashboard{SUPPORTED_DASHBOARD}'"
        )
    return fn  # type: ignore[no-any-return]


def _display_attrs(trial: FrozenTrial) -> list[dict[str, str]]:
    """The rows shown first among a trial's user attributes: feasible, then each constraint."""
    named = named_constraints(trial)
    if not named:
        return []
    return [{"key": "feasible", "value": "yes" if is_feasible(trial) else "no"}] + [
        {"key": f"constraint {name} (≤ 0 is met)", "value": f"{v:+.4g} ({'met' if v <= 0 else 'broken'})"}
        for name, v in named]


@contextlib.contextmanager
def feasibility_patches() -> Iterator[None]:
    """While inside: optuna-dashboard's best trials and trial serialization respect the constraints
    (see the module docstring). Raises ``AutotuneError`` when its internals are not as expected."""
    front = _internal(*_INTERNALS[0])
    serialize = _internal(*_INTERNALS[1])
    app = importlib.import_module("optuna_dashboard._app")
    serializer = importlib.import_module("optuna_dashboard._serializer")

    def feasible_front(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
        return list(front(trials=[t for t in trials if counts_for_front(t)], directions=directions))

    def serialize_trial(study_id: int, trial: FrozenTrial, study_system_attrs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = serialize(study_id, trial, study_system_attrs)
        out["constraints"] = constraint_list(trial)
        out["user_attrs"] = _display_attrs(trial) + list(out.get("user_attrs", []))
        return out

    setattr(app, "get_pareto_front_trials", feasible_front)  # noqa: B010 - a module, not typed
    setattr(serializer, "serialize_frozen_trial", serialize_trial)  # noqa: B010
    try:
        yield
    finally:
        setattr(app, "get_pareto_front_trials", front)  # noqa: B010
        setattr(serializer, "serialize_frozen_trial", serialize)  # noqa: B010


def serve(storage: Any, host: str, port: int, artifacts_dir: Path | None) -> None:
    """Run optuna-dashboard on ``host:port`` until interrupted, with the feasibility patches and,
    when ``artifacts_dir`` exists, the trials' artifacts served from that file-system store."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    store = None
    if artifacts_dir is not None and artifacts_dir.is_dir():
        store = FileSystemArtifactStore(str(artifacts_dir))
    elif artifacts_dir is not None:
        logger.warning("no artifact store at %s: trial artifacts will not open (see --artifacts-dir)",
                       artifacts_dir)
    with feasibility_patches():
        run_server(storage, host=host, port=port, artifact_store=store)
