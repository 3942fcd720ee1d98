"""Optuna storage from a SQLAlchemy URL (SQLite by default, PostgreSQL for several workers)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from autotune.errors import AutotuneError

#: A worker that stops sending heartbeats for this long has its RUNNING trial failed, so a
#: crashed run never blocks the study (Optuna's RDB heartbeat).
HEARTBEAT_S = 30
GRACE_S = 120


def resolve_url(url: str) -> str:
    """``env:NAME`` reads the URL from the environment, so a password never sits in a file or argv."""
    if url.startswith("env:"):
        name = url.removeprefix("env:")
        value = os.environ.get(name)
        if not value:
            raise AutotuneError(f"storage is {url!r} but the environment variable {name} is not set")
        return value
    return url


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Open (and for SQLite, create the folder of) the study storage at ``url``."""
    url = resolve_url(url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def redact(url: str) -> str:
    """The URL with any password replaced, safe to print or log."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage url>"
