"""A run's lease on a study: one row per (study, slot) in the study's own database, so that two
runs of one study never measure at once, and a crashed run is told apart from a live one.

The lease is a row of the table ``autotune_leases`` (created next to Optuna's tables) keyed by the
study name and a slot (``main`` today; parallel workers would each take a slot of their own). It
holds the holder's pid, host, process start time, when it was taken and a heartbeat, renewed
every ``HEARTBEAT_S`` by a background thread. A holder is live while its heartbeat is younger
than ``STALE_S`` and, on this host, its process still exists; a lease of a dead holder is taken
over (deleted by its token, then inserted: two runs taking over at once cannot both win, the
primary key refuses the second insert).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import optuna
import psutil
import sqlalchemy as sa

from autotune.errors import StorageError, StudyBusy
from autotune.study._storage import retry_storage

logger = logging.getLogger(__name__)

#: A holder renews its lease this often.
HEARTBEAT_S = 10.0
#: A lease whose heartbeat is older than this is abandoned (its holder froze or died elsewhere).
STALE_S = 60.0

#: Tokens of leases this process released but could not delete (a storage that stayed locked):
#: dead, although their pid is alive.
_RELEASED: set[str] = set()

_META = sa.MetaData()
_LEASES = sa.Table(
    "autotune_leases", _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("slot", sa.String(128), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("proc_start", sa.Float, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
)


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (``None``: no such process, or a zombie)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as stored."""

    token: str
    pid: int
    host: str
    proc_start: float
    since: float
    heartbeat: float

    def alive(self, now: float) -> bool:
        """Heartbeat fresh and, on this host, the same process still running (pid not reused)."""
        if now - self.heartbeat > STALE_S or self.token in _RELEASED:
            return False
        if self.host != socket.gethostname():
            return True
        started = _process_start(self.pid)
        return started is not None and (started < 0 or abs(started - self.proc_start) < 1.0)

    def describe(self, now: float) -> str:
        since = datetime.fromtimestamp(self.since).isoformat(sep=" ", timespec="seconds")
        return (f"pid {self.pid} on {self.host} since {since} "
                f"(last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)")


class StudyLease:
    """This run's hold on ``study_name`` in ``storage``, as a context manager.

    ``acquire`` raises ``StudyBusy`` naming the live holder; ``release`` is idempotent and never
    raises (a lease it cannot delete is taken over by the next run, its holder being gone).
    ``token`` identifies this run on the trials it measures (see ``TrialRecord.worker``).
    """

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str, slot: str = "main") -> None:
        self.engine: sa.engine.Engine = storage.engine
        self.study, self.slot = study_name, slot
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _row(self, conn: sa.Connection) -> Holder | None:
        row = conn.execute(sa.select(_LEASES).where(
            _LEASES.c.study == self.study, _LEASES.c.slot == self.slot)).mappings().first()
        return None if row is None else _holder(row)

    def acquire(self) -> None:
        """Take the lease, taking over one whose holder is dead; start the heartbeat."""
        url = self.engine.url.render_as_string()
        retry_storage(lambda: _META.create_all(self.engine, checkfirst=True), "create the lease table in", url)
        now = time.time()
        me = {"study": self.study, "slot": self.slot, "token": self.token, "pid": os.getpid(),
              "host": socket.gethostname(), "proc_start": psutil.Process().create_time(),
              "since": now, "heartbeat": now}
        try:
            with self.engine.begin() as conn:
                holder = self._row(conn)
                if holder is not None:
                    if holder.alive(now):
                        raise self._busy(holder, now)
                    logger.info("taking over the study's lease from %s, which is gone",
                                holder.describe(now))
                    conn.execute(sa.delete(_LEASES).where(
                        _LEASES.c.study == self.study, _LEASES.c.slot == self.slot,
                        _LEASES.c.token == holder.token))
                conn.execute(sa.insert(_LEASES).values(**me))
        except sa.exc.IntegrityError:  # another run inserted first
            with self.engine.connect() as conn:
                holder = self._row(conn)
            if holder is None:
                raise StudyBusy(f"study {self.study!r} is being started by another run") from None
            raise self._busy(holder, time.time()) from None
        self._thread = threading.Thread(target=self._beat, name="autotune-lease", daemon=True)
        self._thread.start()

    def _busy(self, holder: Holder, now: float) -> StudyBusy:
        return StudyBusy(f"study {self.study!r} is already running: {holder.describe(now)}; wait "
                         f"for it to finish or stop it (a run whose heartbeat stops for "
                         f"{STALE_S:g} s is taken over)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.engine.begin() as conn:
                    done = conn.execute(sa.update(_LEASES).where(
                        _LEASES.c.study == self.study, _LEASES.c.slot == self.slot,
                        _LEASES.c.token == self.token).values(heartbeat=time.time()))
                if done.rowcount == 0:
                    self.lost = True
                    logger.error("this run lost its lease on study %r to another run", self.study)
                    return
            except sa.exc.SQLAlchemyError as exc:  # e.g. locked: the next beat tries again
                logger.debug("lease heartbeat failed: %s", exc)

    def check(self) -> None:
        """Raise ``StudyBusy`` if another run took the lease over (this one froze too long)."""
        if self.lost:
            with self.engine.connect() as conn:
                holder = self._row(conn)
            who = holder.describe(time.time()) if holder else "another run"
            raise StudyBusy(f"this run lost its lease on study {self.study!r} to {who}; stopping")

    def live_tokens(self) -> set[str]:
        """Tokens of every live holder of a lease on this study (all slots, this run included)."""
        now = time.time()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(_LEASES).where(_LEASES.c.study == self.study)).mappings()
            return {h.token for h in map(_holder, rows) if h.alive(now)}

    def release(self) -> None:
        """Stop the heartbeat and delete this run's lease (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _RELEASED.add(self.token)

        def delete() -> None:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(_LEASES).where(_LEASES.c.token == self.token))

        try:
            retry_storage(delete, "release the study's lease in", self.engine.url.render_as_string())
        except StorageError as exc:
            logger.warning("%s; the next run takes it over", exc)

    def __enter__(self) -> StudyLease:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(row: sa.RowMapping) -> Holder:
    return Holder(token=row["token"], pid=int(row["pid"]), host=row["host"],
                  proc_start=float(row["proc_start"]), since=float(row["since"]),
                  heartbeat=float(row["heartbeat"]))
