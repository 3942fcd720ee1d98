"""Scheduled runs: each one a study of its own in the spec's storage, named by series and time.

A *series* is the spec's ``study.name``; its runs are named ``<series>-<UTC time>`` (e.g.
``backend-staging-20261125T010000Z``) and record a ``RunInfo`` (series, spec hash, autotune
version, start time, previous run). The spec hash covers what makes two runs' measurements
comparable: the search space, objectives, constraints, load, SLO, scenarios and the names and
resources written in the manifests — not the study's name, budget, seed or storage, nor the
timing, the noise control or the target (the target is what changes between runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata

import optuna

from autotune.spec import StudySpec
from autotune.study._record import RunInfo, retune_part, run_info, study_spec

logger = logging.getLogger(__name__)
#: The spec sections the hash covers (camelCase, as the spec is stored on a study).
HASHED_SECTIONS = ("parameters", "objectives", "constraints", "load", "slo", "scenarios", "service", "sidecar")


def autotune_version() -> str:
    """The installed autotune's version (the image's)."""
    try:
        return metadata.version("autotune")
    except metadata.PackageNotFoundError:
        return "unknown"


def spec_hash(spec: StudySpec | Mapping[str, object]) -> str:
    """The first 16 hex digits of the SHA-256 of the hashed sections (``HASHED_SECTIONS``) of a
    spec, or of a spec stored as JSON (``study_spec``), in canonical JSON."""
    data = json.loads(spec.model_dump_json(by_alias=True)) if isinstance(spec, StudySpec) else dict(spec)
    part = {k: data.get(k) for k in HASHED_SECTIONS}
    return hashlib.sha256(json.dumps(part, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def run_name(series: str, started: datetime) -> str:
    """``<series>-<YYYYmmddTHHMMSSZ>`` of a run started at ``started`` (UTC)."""
    return f"{series}-{started.astimezone(UTC):%Y%m%dT%H%M%SZ}"


@dataclass(frozen=True)
class RunSummary:
    """One study of a series as listed: its name, its run record (``None`` for a plain study of
    the series' name, e.g. what ``study start`` made before runs existed) and its trials."""

    name: str
    info: RunInfo | None
    trials: int
    started: datetime | None
    #: A run that stored its outcome (a plain study: never).
    finished: bool = False


def runs_of(storage: optuna.storages.BaseStorage, series: str) -> list[RunSummary]:
    """The studies of ``series`` in ``storage``, oldest first: a plain study named ``series``
    (if any) and every run whose record names the series."""
    out = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        info = run_info(s)
        if (info is not None and info.series == series) or (info is None and s.study_name == series):
            out.append(RunSummary(s.study_name, info, s.n_trials, s.datetime_start,
                                  finished=retune_part(s, "outcome") is not None))
    return sorted(out, key=_order)


def _order(run: RunSummary) -> tuple[int, str]:
    """A plain study first, then runs by start time (ISO text sorts in time order)."""
    return (0, "") if run.info is None else (1, run.info.started)


def previous_run(storage: optuna.storages.BaseStorage, series: str, *,
                 exclude: str | None = None) -> optuna.Study | None:
    """The latest run of ``series`` that finished (stored its outcome), else — for a series with
    no finished run — its latest study with a completed trial (a plain study of the series' name,
    or a run that was interrupted); ``exclude`` is never chosen. Loaded."""
    runs = [r for r in runs_of(storage, series) if r.name != exclude and r.trials > 0]
    finished = [r for r in runs if r.finished]
    for run in reversed(finished or runs):
        study = optuna.load_study(study_name=run.name, storage=storage)
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            return study
    return None


def stored_spec_hash(study: optuna.Study) -> str:
    """The spec hash of a study: recorded by a run, else computed from the stored spec."""
    info = run_info(study)
    return info.spec_hash if info is not None else spec_hash(study_spec(study))
