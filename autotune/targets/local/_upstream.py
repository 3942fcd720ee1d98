"""The service's "pods" for the local target: tiny HTTP/1.1 keep-alive servers, one process each.

Each endpoint answers any request with ``200`` and a fixed body after sleeping the service time on
the event loop (no CPU burned), so the upstreams do not compete with the proxy for CPU.

Run one:
``python -m autotune.targets.local._upstream --port 0 --service-time-ms 5 --response-bytes 128``
It prints ``PORT <n>`` on stdout once it listens, exits on SIGTERM/SIGINT, and with
``--exit-on-stdin-eof`` also when its stdin closes (so it never outlives its parent).
``UpstreamProcess`` starts and stops one from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from autotune._process import child_env, die_with_parent, log_tail, terminate
from autotune.errors import TargetError

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 64 * 1024


class _BadRequest(Exception):
    pass


class HttpProtocol(asyncio.Protocol):
    """One client connection: requests are answered strictly in order, one at a time."""

    def __init__(self, service_time_s: float, body: bytes) -> None:
        self._delay = service_time_s
        self._body = body
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a response is scheduled; later (pipelined) requests wait in _buf
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._next()

    def _next(self) -> None:
        """Parse and schedule the next complete request in the buffer, if idle."""
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
        loop = asyncio.get_running_loop()
        if self._delay > 0:
            self._timer = loop.call_later(self._delay, self._respond, keep_alive, head)
        else:
            self._respond(keep_alive, head)

    def _respond(self, keep_alive: bool, head: bool) -> None:
        self._timer = None
        self._busy = False
        if self._transport is None:
            return
        conn = b"" if keep_alive else b"Connection: close\r\n"
        self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                              + str(len(self._body)).encode() + b"\r\n" + conn + b"\r\n"
                              + (b"" if head else self._body))
        if not keep_alive:
            self._closing = True
            self._transport.close()
            return
        if self._buf:
            self._next()


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


class _StdinWatcher(asyncio.Protocol):
    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop.set()


async def serve(host: str, port: int, service_time_ms: float, response_bytes: int,
                exit_on_stdin_eof: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or stdin EOF); prints ``PORT <n>`` once listening."""
    loop = asyncio.get_running_loop()
    body = b"x" * response_bytes
    server = await loop.create_server(lambda: HttpProtocol(service_time_ms / 1000, body),
                                      host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_on_stdin_eof:
        await loop.connect_read_pipe(lambda: _StdinWatcher(stop), sys.stdin)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of one upstream endpoint."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--service-time-ms", type=float, default=0.0)
    ap.add_argument("--response-bytes", type=int, default=128)
    ap.add_argument("--exit-on-stdin-eof", action="store_true")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.service_time_ms, args.response_bytes,
                      args.exit_on_stdin_eof))


class UpstreamProcess:
    """One endpoint in its own process (own session, so a terminal Ctrl-C does not reach it)."""

    def __init__(self, service_time_ms: float, response_bytes: int, log_dir: Path) -> None:
        self.service_time_ms = service_time_ms
        self.response_bytes = response_bytes
        self._log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._log: IO[bytes] | None = None

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
        """Start the process and return its port once it accepts connections.

        Raises ``TargetError`` (with its stderr) if it does not come up; it is stopped then.
        """
        env = child_env()
        cmd = [sys.executable, "-m", "autotune.targets.local._upstream", "--port", "0",
               "--service-time-ms", str(self.service_time_ms),
               "--response-bytes", str(self.response_bytes), "--exit-on-stdin-eof"]
        log_path = self._log_dir / f"upstream-{len(list(self._log_dir.glob('upstream-*')))}.log"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True,
                                     preexec_fn=die_with_parent())
        try:
            self.port = self._read_port(timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.debug("upstream pid %s on 127.0.0.1:%s", self.proc.pid, self.port)
        return self.port

    def _read_port(self, timeout_s: float) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"upstream endpoint did not start in {timeout_s:.0f}s"
                                  f"{self._stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise TargetError(f"upstream endpoint exited with code {self.proc.returncode}"
                                      f"{self._stderr_tail()}")
                data += chunk
        line = data.split(b"\n", 1)[0].decode()
        if not line.startswith("PORT "):
            raise TargetError(f"upstream endpoint printed {line!r} instead of 'PORT <n>'")
        return int(line.split()[1])

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
