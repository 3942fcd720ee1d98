"""Study storage URLs, checked when the spec is read, without importing SQLAlchemy or a driver.

Optuna stores studies in a SQL database through SQLAlchemy: SQLite, PostgreSQL or MySQL. The URL's
dialect and driver must be ones SQLAlchemy knows and the driver's module must be installed; a SQLite
file is ``sqlite:///relative/path.db`` (to the working directory) or ``sqlite:////absolute/path.db``.
``env:NAME`` reads the URL from the environment variable ``NAME`` when the study opens its storage.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

ENV_PREFIX = "env:"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+._-]*)://(?P<rest>.*)$", re.DOTALL)

#: dialect → {driver: the Python module it needs}; ``""`` is SQLAlchemy's default driver.
_DRIVERS: dict[str, dict[str, str]] = {
    "sqlite": {"": "sqlite3", "pysqlite": "sqlite3"},
    "postgresql": {"": "psycopg2", "psycopg2": "psycopg2", "psycopg": "psycopg", "pg8000": "pg8000",
                   "psycopg2cffi": "psycopg2cffi"},
    "mysql": {"": "MySQLdb", "mysqldb": "MySQLdb", "pymysql": "pymysql", "mysqlconnector": "mysql",
              "mariadbconnector": "mariadb"},
}
#: Schemes people write that SQLAlchemy does not know, with what to write instead.
_SUGGEST = {"postgres": "postgresql", "pgsql": "postgresql", "psql": "postgresql", "mariadb": "mysql",
            "sqlite3": "sqlite", "file": "sqlite"}
_WHAT_WORKS = ("Optuna stores studies in SQLite (sqlite:///path.db), PostgreSQL "
               "(postgresql://user@host/db) or MySQL (mysql+pymysql://user@host/db)")


def check_storage_url(url: str, *, resolve_env: bool = True) -> list[str]:
    """Problems with a storage URL (empty if it is usable); never echoes a password.

    ``env:NAME`` must name a valid variable; with ``resolve_env`` and the variable set, its value
    is checked too. An unset variable is reported when the storage is opened, not here.
    """
    if url.startswith(ENV_PREFIX):
        name = url.removeprefix(ENV_PREFIX)
        if not _ENV_NAME_RE.match(name):
            hint = f"; write env:{name.lstrip('${').rstrip('}')}" if name.startswith("$") else ""
            return [f"env:NAME needs a variable name (letters, digits, _; not starting with a digit; "
                    f"'$' is never part of it), got {name!r}{hint}"]
        value = os.environ.get(name) if resolve_env else None
        if value:
            return [f"{p} (from the environment variable {name})" for p in check_storage_url(value,
                                                                                              resolve_env=False)]
        return []
    m = _URL_RE.match(url)
    if m is None:
        return [_not_a_url(url)]
    scheme, rest = m.group("scheme"), m.group("rest")
    dialect, _, driver = scheme.partition("+")
    if dialect not in _DRIVERS:
        if dialect.lower() in _SUGGEST:
            better = _SUGGEST[dialect.lower()]
            return [f"unknown database {dialect + '://'!r}: SQLAlchemy calls it {better + '://'!r} "
                    f"(write {better}{scheme[len(dialect):]}://…)"]
        return [f"unsupported storage {scheme + '://'!r}: {_WHAT_WORKS}"]
    module = _DRIVERS[dialect].get(driver)
    if module is None:
        known = ", ".join(f"{dialect}+{d}" for d in _DRIVERS[dialect] if d)
        return [f"unknown {dialect} driver {driver!r}; SQLAlchemy knows {known}"]
    if importlib.util.find_spec(module) is None:
        others = [f"{dialect}+{d}://" for d, mod in _DRIVERS[dialect].items()
                  if d and mod != module and importlib.util.find_spec(mod) is not None]
        also = f", or name an installed driver: {', '.join(others)}" if others else ""
        return [f"{scheme}:// needs the Python module {module!r}, which is not installed "
                f"(pip install {_PIP.get(module, module)}){also}"]
    return _check_sqlite(rest) if dialect == "sqlite" else []


_PIP = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "MySQLdb": "mysqlclient",
        "mysql": "mysql-connector-python"}


def _not_a_url(url: str) -> str:
    if url.strip() == "":
        return "must not be empty; the default is sqlite:///trials/autotune.db"
    if "://" not in url and re.match(r"^[A-Za-z0-9_./~-]+$", url):
        return f"{url!r} is a path, not a URL; a SQLite file is written sqlite:///{url}"
    return f"{url!r} is not a URL (scheme://…); {_WHAT_WORKS}"


def _check_sqlite(rest: str) -> list[str]:
    """``rest`` is what follows ``sqlite://``: empty (in memory) or ``/path``."""
    path_part = rest.split("?", 1)[0]
    if path_part in ("", "/", "/:memory:"):
        return ["an in-memory SQLite database forgets the study when autotune exits; name a file, "
                "e.g. sqlite:///trials/autotune.db"]
    if not path_part.startswith("/"):
        host = path_part.partition("/")[0]
        return [f"sqlite://{path_part} names a host ({host!r}), which SQLite has not: a file relative to "
                f"the working directory is sqlite:///{path_part}, an absolute one sqlite:////abs/path.db"]
    path = Path(path_part[1:])
    if path.is_dir():
        return [f"the study storage {path} is a folder; name a database file in it, e.g. "
                f"sqlite:///{path / 'autotune.db'}"]
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return [f"cannot create the folder of the study storage {path}: {parent} is a file"]
            break
    return []
