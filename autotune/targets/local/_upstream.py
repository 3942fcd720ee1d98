"""The service's "pods" for the local target: small HTTP/1.1 keep-alive app servers, one process each.

Each endpoint has a finite capacity like an app server's thread pool: ``--workers`` requests are
worked on at once, the others wait in its FIFO queue (at most ``--queue-limit``, beyond which it
answers ``503``). A request's service time is drawn from a distribution (fixed, exponential,
log-normal) and waited on the event loop, never burned: the upstreams do not compete with the proxy
for CPU. Faults (extra latency, a service-time factor, a share of 503s or of reset connections,
refused connections) can be changed while it runs.

Run one:
``python -m autotune.targets.local._upstream --port 0 --service-time-ms 5 --workers 8``
It prints ``PORT <n>`` on stdout once it listens, then answers one line per JSON command line read
from stdin (``{"faults": {...}}`` → ``OK``, ``{"stats": true}`` → counts as JSON); it exits on
SIGTERM/SIGINT, and with ``--exit-on-stdin-eof`` also when its stdin closes (so it never outlives
its parent). ``UpstreamProcess`` starts, controls and stops one from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from autotune._process import child_env, die_with_parent, log_tail, terminate
from autotune.errors import TargetError

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 64 * 1024


class _BadRequest(Exception):
    pass


@dataclass(frozen=True)
class Faults:
    """How one endpoint misbehaves (all zero / 1.0 / False: it does not): each request takes
    ``delay_ms`` more and ``service_time_factor`` times its service time, holding its worker; a
    share ``error_rate`` is answered ``503`` at once, a share ``reset_rate`` has its connection
    reset (TCP RST) after the request arrived, before any response. With ``refuse_connections``
    the endpoint stops listening and drops its open connections, as a replica whose process
    crashed while it is still among the service's endpoints: every connection is refused.

    What a client sidecar does with each (Istio's default route retry policy, measured on the
    local Envoy 1.40): a refused connection is a ``connect-failure`` and is retried on another
    endpoint; a ``503`` response is not retried (no ``retriable_status_codes`` by default); a
    reset of an established connection is not retried either, even before the endpoint read the
    request: Envoy's ``connect-failure`` covers only connections that never opened, a reset of
    an open one needs ``reset`` in ``retry_on``, which Istio's default does not set."""

    delay_ms: float = 0.0
    service_time_factor: float = 1.0
    error_rate: float = 0.0
    reset_rate: float = 0.0
    refuse_connections: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Faults:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> Faults:
        """From ``asdict`` output (numbers as floats, ``refuse_connections`` as a bool); an
        unknown key raises ``TypeError``."""
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            if key == "refuse_connections":
                if not isinstance(value, bool):
                    raise TypeError(f"refuse_connections must be true or false, got {value!r}")
                kwargs[key] = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                kwargs[key] = float(value)
            else:
                raise TypeError(f"{key} must be a number, got {value!r}")
        return cls(**kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Faults:
        """The faults named by the ``AUTOTUNE_FAULT_*`` variables of ``env`` (:data:`FAULT_ENV`:
        what the Kubernetes target writes on a misbehaving replica); unset ones: none."""
        values: dict[str, object] = {f: float(env[name]) for f, name in FAULT_ENV.items()
                                     if f != "refuse_connections" and env.get(name)}
        refuse = env.get(FAULT_ENV["refuse_connections"], "").strip().lower()
        if refuse:
            values["refuse_connections"] = refuse in ("1", "true", "yes")
        return cls.from_dict(values)


#: The environment contract of a misbehaving replica, one variable per :class:`Faults` field.
FAULT_ENV = {"delay_ms": "AUTOTUNE_FAULT_DELAY_MS",
             "service_time_factor": "AUTOTUNE_FAULT_SERVICE_TIME_FACTOR",
             "error_rate": "AUTOTUNE_FAULT_ERROR_RATE",
             "reset_rate": "AUTOTUNE_FAULT_RESET_RATE",
             "refuse_connections": "AUTOTUNE_FAULT_REFUSE_CONNECTIONS"}


class ServiceTimeSampler:
    """Service times in seconds: ``fixed`` (always the mean), ``exponential`` (that mean) or
    ``lognormal`` (that mean, ``sigma`` the standard deviation of the log). Seeded: reproducible."""

    def __init__(self, distribution: str, mean_ms: float, sigma: float = 0.5,
                 seed: int | None = None) -> None:
        if distribution not in ("fixed", "exponential", "lognormal"):
            raise ValueError(f"distribution must be fixed, exponential or lognormal, "
                             f"but got {distribution!r}")
        self.distribution, self.mean_s, self.sigma = distribution, mean_ms / 1000, sigma
        self._rng = random.Random(seed)
        self._mu = math.log(self.mean_s) - sigma * sigma / 2 if self.mean_s > 0 else 0.0

    def sample(self) -> float:
        """One service time in seconds (>= 0)."""
        if self.mean_s <= 0 or self.distribution == "fixed":
            return max(self.mean_s, 0.0)
        if self.distribution == "exponential":
            return self._rng.expovariate(1 / self.mean_s)
        return self._rng.lognormvariate(self._mu, self.sigma)


class Endpoint:
    """An app server's worker pool: at most ``workers`` requests are worked on at once (``None``:
    no limit), the rest wait in FIFO order; with ``queue_limit`` waiting, the next is answered
    ``503`` at once. Work is a timer on the event loop: no CPU is burned."""

    def __init__(self, workers: int | None, queue_limit: int | None, sampler: ServiceTimeSampler,
                 body: bytes, seed: int | None = None) -> None:
        self.workers, self.queue_limit, self.sampler, self.body = workers, queue_limit, sampler, body
        self.faults = Faults()
        #: Open client connections (dropped when the endpoint starts refusing connections).
        self.connections: set[HttpProtocol] = set()
        self.busy = 0
        self.queue: deque[tuple[HttpProtocol, bool, bool]] = deque()
        self.counts = {"served": 0, "queued": 0, "overflow_503": 0, "fault_503": 0, "fault_reset": 0,
                       "max_queue": 0}
        self._rng = random.Random(seed)

    def handle(self, conn: HttpProtocol, keep_alive: bool, head: bool) -> None:
        """Answer one parsed request on ``conn`` (now, after its service time, or once queued)."""
        draw = self._rng.random()
        if draw < self.faults.reset_rate:
            self.counts["fault_reset"] += 1
            conn.reset()
        elif draw < self.faults.reset_rate + self.faults.error_rate:
            self.counts["fault_503"] += 1
            conn.respond(503, keep_alive, head, b"fault")
        elif self.workers is None or self.busy < self.workers:
            self._work(conn, keep_alive, head)
        elif self.queue_limit is not None and len(self.queue) >= self.queue_limit:
            self.counts["overflow_503"] += 1
            conn.respond(503, keep_alive, head, b"overflow")
        else:
            self.queue.append((conn, keep_alive, head))
            self.counts["queued"] += 1
            self.counts["max_queue"] = max(self.counts["max_queue"], len(self.queue))

    def _work(self, conn: HttpProtocol, keep_alive: bool, head: bool) -> None:
        self.busy += 1
        delay = self.sampler.sample() * self.faults.service_time_factor + self.faults.delay_ms / 1000
        # The worker stays busy for the whole service time even if the client goes away.
        asyncio.get_running_loop().call_later(delay, self._done, conn, keep_alive, head)

    def _done(self, conn: HttpProtocol, keep_alive: bool, head: bool) -> None:
        self.busy -= 1
        self.counts["served"] += 1
        while self.queue:  # FIFO: the longest-waiting request gets the worker first
            nxt = self.queue.popleft()
            if nxt[0].connected:  # requests of closed connections are dropped, not worked on
                self._work(*nxt)
                break
        conn.respond(200, keep_alive, head)


_REASONS = {200: b"OK", 503: b"Service Unavailable"}
#: Header on every ``503`` an endpoint answers itself (value ``fault`` or ``overflow``).
FAULT_HEADER = "x-upstream-503"


class HttpProtocol(asyncio.Protocol):
    """One client connection: requests are answered strictly in order, one at a time, by the
    shared ``Endpoint``."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a request is with the endpoint; later (pipelined) ones wait in _buf
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._closing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._endpoint.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._endpoint.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._next()

    def _next(self) -> None:
        """Parse the next complete request in the buffer and hand it to the endpoint, if idle."""
        if self._busy or self._closing or self._transport is None:
            return
        try:
            parsed = _parse_request(self._buf)
        except _BadRequest:
            self._closing = True
            self._transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")
            self._transport.close()
            return
        if parsed is None:
            if len(self._buf) > _MAX_HEADER_BYTES + 16 * 1024 * 1024:
                self._transport.close()
            return
        consumed, keep_alive, head = parsed
        del self._buf[:consumed]
        self._busy = True
        self._endpoint.handle(self, keep_alive, head)

    def respond(self, status: int, keep_alive: bool, head: bool, why: bytes = b"") -> None:
        """Send the response to the request being handled (dropped if the client has gone);
        a ``503`` says ``why`` in ``FAULT_HEADER``."""
        self._busy = False
        if self._transport is None or self._closing:
            return
        body = self._endpoint.body if status == 200 else b"unavailable"
        conn = b"" if keep_alive else b"Connection: close\r\n"
        if why:
            conn += FAULT_HEADER.encode() + b": " + why + b"\r\n"
        self._transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                              % (status, _REASONS[status], len(body))
                              + conn + b"\r\n" + (b"" if head else body))
        if not keep_alive:
            self._closing = True
            self._transport.close()
            return
        if self._buf:
            self._next()

    def reset(self) -> None:
        """Reset the connection (TCP RST) without answering."""
        self._busy = False
        if self._transport is None:
            return
        self._closing = True
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()


def _parse_request(buf: bytearray) -> tuple[int, bool, bool] | None:
    """``(bytes consumed, keep-alive, is HEAD)`` of the first complete request, ``None`` if
    incomplete. Bodies are skipped by Content-Length or chunked framing."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > _MAX_HEADER_BYTES:
            raise _BadRequest
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _BadRequest
        headers[name.strip().lower()] = value.strip()
    connection = headers.get(b"connection", b"").lower()
    http10 = parts[2] == b"HTTP/1.0"
    keep_alive = b"keep-alive" in connection if http10 else b"close" not in connection
    pos = end + 4
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body_end = _chunked_end(buf, pos)
        if body_end is None:
            return None
        return body_end, keep_alive, parts[0] == b"HEAD"
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise _BadRequest from None
    if length < 0:
        raise _BadRequest
    if len(buf) < pos + length:
        return None
    return pos + length, keep_alive, parts[0] == b"HEAD"


def _chunked_end(buf: bytearray, pos: int) -> int | None:
    """Offset just past a chunked body starting at ``pos`` (trailers included), else ``None``."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[pos:eol]).split(b";")[0].strip(), 16)
        except ValueError:
            raise _BadRequest from None
        pos = eol + 2
        if size == 0:
            while True:  # trailers, ended by an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        pos += size + 2


class _Listener:
    """The endpoint's listening socket on a fixed port: open, or closed while the endpoint
    refuses connections (its open connections are then reset, as when a process dies)."""

    def __init__(self, host: str, port: int, endpoint: Endpoint) -> None:
        self.host, self.port, self._endpoint = host, port, endpoint
        self._server: asyncio.Server | None = None

    async def open(self) -> None:
        """Listen (again) on ``host:port`` (port 0: any free port, kept from then on)."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpProtocol(self._endpoint), self.host,
                                                self.port, backlog=4096, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening (connections are refused from now on) and reset the open ones."""
        if self._server is not None:
            self._server.close()  # closes the listening socket now
            self._server = None
        for conn in list(self._endpoint.connections):
            conn.reset()

    async def follow(self, faults: Faults) -> None:
        """Listen or not, as ``faults.refuse_connections`` says."""
        if faults.refuse_connections:
            self.close()
        else:
            await self.open()


class _Control(asyncio.Protocol):
    """The parent's control channel on stdin, one JSON line per command, one line answered on
    stdout, in order: ``{"faults": {...}}`` sets the faults (``OK`` once in force, the listener
    closed or open again), ``{"stats": true}`` returns the endpoint's counts as JSON. EOF stops
    the endpoint (if ``stop_on_eof``)."""

    def __init__(self, endpoint: Endpoint, listener: _Listener, stop: asyncio.Event,
                 stop_on_eof: bool) -> None:
        self._endpoint, self._listener = endpoint, listener
        self._stop, self._stop_on_eof = stop, stop_on_eof
        self._buf = b""
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self._lines.put_nowait(line)

    async def _work(self) -> None:
        while True:
            _answer(await self._command(await self._lines.get()))

    async def _command(self, line: bytes) -> str:
        try:
            cmd = json.loads(line)
            if "faults" in cmd:
                faults = Faults.from_dict(cmd["faults"])
                self._endpoint.faults = faults
                await self._listener.follow(faults)
                return "OK"
            if "stats" in cmd:
                return json.dumps({**self._endpoint.counts, "busy": self._endpoint.busy,
                                   "waiting": len(self._endpoint.queue)})
        except (ValueError, TypeError, AttributeError, OSError) as exc:
            return f"ERROR {type(exc).__name__}: {exc}"
        return "ERROR unknown command"

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker.cancel()
        if self._stop_on_eof:
            self._stop.set()


def _answer(line: str) -> None:
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


async def serve(host: str, port: int, endpoint: Endpoint, exit_on_stdin_eof: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or stdin EOF); prints ``PORT <n>`` once its port is bound
    (and listening, unless its faults refuse connections), then answers control commands read
    from stdin."""
    loop = asyncio.get_running_loop()
    listener = _Listener(host, port, endpoint)
    await listener.open()
    await listener.follow(endpoint.faults)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await loop.connect_read_pipe(lambda: _Control(endpoint, listener, stop, exit_on_stdin_eof),
                                     sys.stdin)
    except ValueError:  # stdin is a regular file: no control channel
        logger.debug("stdin is not a pipe: no control channel")
    _answer(f"PORT {listener.port}")
    try:
        await stop.wait()
    finally:
        listener.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of one upstream endpoint."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--service-time-ms", type=float, default=0.0, help="mean service time")
    ap.add_argument("--distribution", default="fixed", choices=["fixed", "exponential", "lognormal"])
    ap.add_argument("--sigma", type=float, default=0.5, help="lognormal: std. dev. of the log")
    ap.add_argument("--workers", type=int, default=0, help="concurrent workers (0: no limit)")
    ap.add_argument("--queue-limit", type=int, default=-1, help="waiting requests (-1: no limit)")
    ap.add_argument("--faults", default=None,
                    help="initial faults, as JSON (default: the AUTOTUNE_FAULT_* environment variables)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--response-bytes", type=int, default=128)
    ap.add_argument("--exit-on-stdin-eof", action="store_true")
    args = ap.parse_args(argv)
    sampler = ServiceTimeSampler(args.distribution, args.service_time_ms, args.sigma, args.seed)
    endpoint = Endpoint(args.workers or None, None if args.queue_limit < 0 else args.queue_limit,
                        sampler, b"x" * args.response_bytes, args.seed)
    endpoint.faults = Faults.from_json(args.faults) if args.faults is not None else Faults.from_env(os.environ)
    asyncio.run(serve(args.host, args.port, endpoint, args.exit_on_stdin_eof))


class UpstreamProcess:
    """One endpoint in its own process (own session, so a terminal Ctrl-C does not reach it).

    ``workers=None`` (the default here) means no worker limit, ``queue_limit=None`` an unbounded
    queue; ``set_faults`` changes how it misbehaves while it runs (and across a restart).
    """

    def __init__(self, service_time_ms: float, response_bytes: int, log_dir: Path, *,
                 distribution: str = "fixed", sigma: float = 0.5, workers: int | None = None,
                 queue_limit: int | None = None, faults: Faults | None = None,
                 seed: int | None = None) -> None:
        self.service_time_ms = service_time_ms
        self.response_bytes = response_bytes
        self.distribution, self.sigma = distribution, sigma
        self.workers, self.queue_limit, self.seed = workers, queue_limit, seed
        self.faults = faults or Faults()
        self._log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._log: IO[bytes] | None = None
        self._out = b""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        """True while the process started by ``start`` runs (reaps it once it has exited)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once it has exited (negative: killed by that signal)."""
        return self.proc.returncode if self.proc is not None else None

    def start(self, timeout_s: float = 10.0) -> int:
        """Start the process (with the current ``faults``) and return its port once it accepts
        connections.

        Raises ``TargetError`` (with its stderr) if it does not come up; it is stopped then.
        """
        env = child_env()
        cmd = [sys.executable, "-m", "autotune.targets.local._upstream", "--port", "0",
               "--service-time-ms", str(self.service_time_ms), "--distribution", self.distribution,
               "--sigma", str(self.sigma), "--workers", str(self.workers or 0),
               "--queue-limit", str(-1 if self.queue_limit is None else self.queue_limit),
               "--faults", self.faults.to_json(),
               "--response-bytes", str(self.response_bytes), "--exit-on-stdin-eof"]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        log_path = self._log_dir / f"upstream-{len(list(self._log_dir.glob('upstream-*')))}.log"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._out = b""
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True,
                                     preexec_fn=die_with_parent())
        try:
            line = self._read_line(timeout_s, "start")
            if not line.startswith("PORT "):
                raise TargetError(f"upstream endpoint printed {line!r} instead of 'PORT <n>'")
            self.port = int(line.split()[1])
        except BaseException:
            self.stop()
            raise
        logger.debug("upstream pid %s on 127.0.0.1:%s", self.proc.pid, self.port)
        return self.port

    def set_faults(self, faults: Faults, timeout_s: float = 5.0) -> None:
        """Make the running endpoint misbehave as ``faults`` says from now on (``Faults()``: not at
        all); returns once it has taken them. Kept for a restart. Raises ``TargetError`` if the
        endpoint does not answer."""
        self.faults = faults
        answer = self._command(json.dumps({"faults": asdict(faults)}), timeout_s)
        if answer != "OK":
            raise TargetError(f"upstream endpoint pid {self.pid} refused the faults: {answer}")

    def stats(self, timeout_s: float = 5.0) -> dict[str, int]:
        """The endpoint's counts since it started: ``served``, ``queued``, ``overflow_503``
        (queue full), ``fault_503``, ``fault_reset``, ``max_queue``, and ``busy`` and ``waiting`` now."""
        counts: dict[str, int] = json.loads(self._command('{"stats": true}', timeout_s))
        return counts

    def _command(self, line: str, timeout_s: float) -> str:
        if self.proc is None or self.proc.stdin is None or not self.alive:
            raise TargetError(f"upstream endpoint (pid {self.pid}) is not running")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise TargetError(f"cannot reach upstream endpoint pid {self.pid}: {exc}") from exc
        return self._read_line(timeout_s, "answer")

    def _read_line(self, timeout_s: float, what: str) -> str:
        """The next line the endpoint prints on stdout; ``TargetError`` on timeout or exit."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"upstream endpoint did not {what} in {timeout_s:.0f}s"
                                  f"{self._stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise TargetError(f"upstream endpoint exited with code {self.proc.returncode}"
                                      f"{self._stderr_tail()}")
                self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        return line.decode()

    def _stderr_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        text = log_tail(Path(self._log.name))
        return ":\n" + text if text else ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the process by its PID (SIGTERM, then SIGKILL) and release its pipes. Idempotent."""
        proc = self.proc
        if proc is not None:
            terminate(proc, timeout_s)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    main()
