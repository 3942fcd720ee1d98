"""autotune's built-in locustfile: a paced, staggered GET load that records every request itself.

Run by ``autotune.load.LocustDriver`` as ``python -m locust -f locustfile.py --headless …`` in its own
process (Locust monkey-patches the interpreter with gevent, so it never runs inside the tuner).

Environment variables (all set by the runner; the defaults make the file usable by hand):

``AUTOTUNE_PATH``           path to GET on the ``--host`` (default ``/``)
``AUTOTUNE_RATE``           requests per second *per user* (default ``10``)
``AUTOTUNE_USERS``          number of users (informational, for custom locustfiles)
``AUTOTUNE_MARKER``         file written (atomically, JSON ``{"start": <time.time()>, "pid": …}``)
                            when the test starts; the runner times warm-up and window from it
``AUTOTUNE_RESULTS``        file the raw records are written to when Locust quits (see below)
``AUTOTUNE_PARENT_PID``     the tuner's pid; if it goes away Locust stops itself (no orphans)
``AUTOTUNE_MAX_RECORDS``    cap on records kept in memory (default 5,000,000; ~17 bytes each);
                            beyond it the results are flagged ``truncated``
``AUTOTUNE_CONNECT_TIMEOUT``/``AUTOTUNE_NETWORK_TIMEOUT``  FastHttpUser timeouts, s (5 / 10)

Pacing: each user sends one request every ``1/AUTOTUNE_RATE`` s on a fixed schedule (no drift;
if a request overruns its slot the next one starts at once, and a user that falls more than a
whole period behind drops the missed slots rather than bursting to catch up, so an overloaded
target shows up as a lower achieved rate). Each request carries its schedule: the slot it was
due at (the earliest slot missed, when slots were dropped) and how many slots it stands for
(1 + the slots dropped before it), so the runner can measure latency free of coordinated
omission (from when the schedule said each request should start). Users are staggered: user *i* waits
``frac(i·φ)/rate`` before its first request (a low-discrepancy spread over one period), so the
load is smooth rather than arriving in bursts of ``users`` requests.

Recording: a listener on ``events.request`` keeps, for every request, the wall-clock end time
(``time.time()``), the raw response time in ms (float, sub-ms resolution, not Locust's rounded
statistics), the HTTP status (0 when no response arrived) and whether it failed (an exception or
a non-2xx status — a 503 from a circuit breaker is a failure), and from the request's
``context`` the wall-clock time its schedule said it was due (NaN when unscheduled) and the
number of slots it stands for.

Results file format (version 2): one JSON header line
``{"version": 2, "count": n, "truncated": bool, "start": t0, "period": s, "flush": k}\\n``
followed by ``n`` little-endian float64 end times, ``n`` float64 response times (ms), ``n``
int32 statuses, ``n`` uint8 failure flags, ``n`` float64 due times and ``n`` uint32 slot
counts. It is written atomically on ``test_stop``, on ``quitting`` and on ``SIGUSR1`` (the
runner's request for the records so far; ``flush`` counts the writes).

Custom locustfiles: to be measured by autotune a locustfile must produce the marker and the
results. Add this one line to yours::

    import autotune.load.locustfile  # noqa: F401  (registers autotune's recording listeners)

Use ``import``, not ``from … import *``: Locust runs every User class found in your file's
namespace, and a star import would add :class:`PacedUser` to your own users. The listeners are
registered once however often the module is imported. Your users decide pacing themselves;
autotune measures whatever requests they make on the window the runner chooses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from array import array
from collections.abc import Callable
from itertools import count

import gevent
from locust import FastHttpUser, events, task
from locust.event import EventHook

logger = logging.getLogger(__name__)

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # frac(i·φ) spreads any number of users evenly


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


class _Recorder:
    """Raw per-request records in compact arrays (bounded by ``AUTOTUNE_MAX_RECORDS``)."""

    def __init__(self) -> None:
        self.ends = array("d")
        self.latencies = array("d")
        self.statuses = array("i")
        self.failed = array("B")
        self.dues = array("d")
        self.slots = array("I")
        self.flushes = 0
        self.truncated = False
        self.start: float | None = None
        self.max_records = int(_env_float("AUTOTUNE_MAX_RECORDS", 5_000_000))
        self.marker_path = os.environ.get("AUTOTUNE_MARKER")
        self.results_path = os.environ.get("AUTOTUNE_RESULTS")
        self._watchdog: gevent.Greenlet | None = None

    # -- listeners ---------------------------------------------------------------------------
    def on_request(
        self, response_time: float | None = None, response: object = None,
        exception: BaseException | None = None, context: object = None, **_: object,
    ) -> None:
        """Record one finished request (called by Locust for every request of every user)."""
        end = time.time()
        if len(self.ends) >= self.max_records:
            self.truncated = True
            return
        status = getattr(response, "status_code", None) or 0
        try:
            status = int(status)
        except (TypeError, ValueError):
            status = 0
        self.ends.append(end)
        self.latencies.append(float(response_time) if response_time is not None else math.nan)
        self.statuses.append(status)
        self.failed.append(1 if exception is not None or not 200 <= status < 300 else 0)
        ctx = context if isinstance(context, dict) else {}
        self.dues.append(float(ctx.get("autotune_due", math.nan)))
        self.slots.append(int(ctx.get("autotune_slots", 1)))

    def on_test_start(self, environment: object = None, **_: object) -> None:
        """Write the started marker and arm the parent watchdog."""
        self.start = time.time()
        if self.marker_path:
            _atomic_write(
                self.marker_path,
                json.dumps({"start": self.start, "pid": os.getpid()}).encode(),
            )
        parent = os.environ.get("AUTOTUNE_PARENT_PID")
        if parent and self._watchdog is None:
            self._watchdog = gevent.spawn(_watch_parent, int(parent))

    def on_stop(self, **_: object) -> None:
        """Write all records to ``AUTOTUNE_RESULTS`` (idempotent; the last call wins)."""
        if not self.results_path:
            return
        self.flushes += 1
        header = {
            "version": 2,
            "count": len(self.ends),
            "truncated": self.truncated,
            "start": self.start,
            "period": 1.0 / _env_float("AUTOTUNE_RATE", 10.0),
            "flush": self.flushes,
        }
        blob = b"".join(
            [
                json.dumps(header).encode() + b"\n",
                _le_bytes(self.ends),
                _le_bytes(self.latencies),
                _le_bytes(self.statuses),
                self.failed.tobytes(),
                _le_bytes(self.dues),
                _le_bytes(self.slots),
            ]
        )
        _atomic_write(self.results_path, blob)


def _le_bytes(a: array[int] | array[float]) -> bytes:
    # array("I") is 4 bytes on every platform CPython supports (checked at import below).
    if sys.byteorder == "little":
        return a.tobytes()
    b = a[:]  # a copy
    b.byteswap()
    return b.tobytes()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _watch_parent(parent_pid: int) -> None:
    """Stop Locust (gracefully, via its SIGTERM handler) once the tuner process has gone."""
    while True:
        gevent.sleep(1.0)
        if os.getppid() != parent_pid:
            logger.warning("autotune (pid %d) went away; stopping Locust", parent_pid)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _listen(hook: EventHook, handler: Callable[..., None]) -> None:
    add: Callable[[Callable[..., None]], object] = hook.add_listener  # untyped in locust
    add(handler)


# Register once, even if a custom locustfile imports this module as well.
_MARK = "_autotune_recorder"  # set on locust's ``events`` once the recorder listens
if not getattr(events, _MARK, None):
    _recorder = _Recorder()
    setattr(events, _MARK, _recorder)
    _listen(events.request, _recorder.on_request)
    _listen(events.test_start, _recorder.on_test_start)
    _listen(events.test_stop, _recorder.on_stop)
    _listen(events.quitting, _recorder.on_stop)
    assert array("I").itemsize == 4
    gevent.signal_handler(signal.SIGUSR1, _recorder.on_stop)  # the runner asks for the records so far


class PacedUser(FastHttpUser):
    """GETs ``AUTOTUNE_PATH`` every ``1/AUTOTUNE_RATE`` seconds on a fixed, staggered schedule."""

    path = os.environ.get("AUTOTUNE_PATH", "/")
    period = 1.0 / _env_float("AUTOTUNE_RATE", 10.0)
    connection_timeout = _env_float("AUTOTUNE_CONNECT_TIMEOUT", 5.0)
    network_timeout = _env_float("AUTOTUNE_NETWORK_TIMEOUT", 10.0)
    _index = count()

    def on_start(self) -> None:
        offset = ((next(PacedUser._index) * _GOLDEN) % 1.0) * self.period
        gevent.sleep(offset)
        self._next_due = time.monotonic()
        self._first_due = self._next_due  # the earliest slot the next request stands for
        self._slots = 1

    def wait_time(self) -> float:
        """Seconds until this user's next slot; 0 if late. Slots more than a period old are
        dropped (the schedule keeps its phase); the next request stands for them."""
        now = time.monotonic()
        self._next_due += self.period
        self._first_due, self._slots = self._next_due, 1
        if self._next_due < now - self.period:
            dropped = math.floor((now - self._next_due) / self.period)
            self._next_due += dropped * self.period
            self._slots += dropped
        return max(0.0, self._next_due - now)

    @task
    def get(self) -> None:
        due = time.time() - (time.monotonic() - self._first_due)
        self.client.get(self.path, name=self.path,
                        context={"autotune_due": due, "autotune_slots": self._slots})
