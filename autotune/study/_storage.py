"""Optuna storage from a SQLAlchemy URL (SQLite by default, PostgreSQL for several workers), and
the one place that turns storage failures into a one-line ``StorageError``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import optuna

from autotune.errors import AutotuneError, StorageError

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: How long one SQLite statement waits for another connection's lock (SQLite's busy timeout).
BUSY_TIMEOUT_S = 10.0
#: How long a write the storage refused (e.g. locked) is retried before the run stops.
RETRY_S = 60.0


def resolve_url(url: str) -> str:
    """``env:NAME`` reads the URL from the environment, so a password never sits in a file or argv."""
    if url.startswith("env:"):
        name = url.removeprefix("env:")
        value = os.environ.get(name)
        if not value:
            raise AutotuneError(f"storage is {url!r} but the environment variable {name} is not set")
        return value
    return url


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (``None`` for another database or an in-memory one)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def make_storage(url: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """Open the study storage at ``url``; for SQLite, create its folder and file unless
    ``create`` is False (then a missing file is a ``StorageError``: reading commands never
    create a database). SQLite waits up to ``BUSY_TIMEOUT_S`` for another writer's lock.
    Raises ``StorageError`` (one line) for every failure to open it."""
    url = resolve_url(url)
    engine_kwargs: dict[str, dict[str, float]] = {}
    path = sqlite_path(url)
    if path is not None:
        if path.is_dir():
            raise StorageError(f"the study storage {path} is a folder, not a SQLite file")
        if not create and not path.exists():
            raise StorageError(f"no study storage at {path}: nothing was run with it yet")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder of the study storage {path}: "
                               f"{exc.strerror or exc}") from None
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S}
    # Retried: besides a lock, two runs creating one new database race on its tables.
    return retry_storage(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs),
                         "open", url)


def _cause(exc: BaseException) -> str:
    """The database's own words for a failure, on one line (``database is locked``)."""
    from sqlalchemy.exc import DBAPIError

    inner: BaseException = exc
    while inner.__cause__ is not None and not isinstance(inner, DBAPIError):
        inner = inner.__cause__
    text = str(inner.orig) if isinstance(inner, DBAPIError) else str(inner)
    return " ".join(text.split()) or type(inner).__name__


def _storage_failures() -> tuple[type[Exception], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    return optuna.exceptions.StorageInternalError, SQLAlchemyError


@contextmanager
def storage_errors(url: str, doing: str) -> Iterator[None]:
    """Turn a failure of the storage inside the block into ``StorageError`` naming the storage
    (password hidden), what was being done and the database's reason."""
    try:
        yield
    except _storage_failures() as exc:
        raise StorageError(f"could not {doing} the study storage {redact(url)}: {_cause(exc)}") from exc


def retry_storage(fn: Callable[[], T], doing: str, url: str) -> T:
    """Call ``fn`` (a storage operation that may be repeated) until it succeeds, for at most
    ``RETRY_S`` seconds (each attempt itself waits ``BUSY_TIMEOUT_S`` on a lock); then raise
    ``StorageError``."""
    deadline = time.monotonic() + RETRY_S
    delay = 0.05
    while True:
        try:
            return fn()
        except _storage_failures() as exc:
            if time.monotonic() + delay >= deadline:
                raise StorageError(f"could not {doing} the study storage {redact(url)} within "
                                   f"{RETRY_S:g} s: {_cause(exc)}") from exc
            logger.debug("storage refused to %s (%s); retrying", doing, _cause(exc))
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def redact(url: str) -> str:
    """The URL with any password replaced, safe to print or log."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage url>"
