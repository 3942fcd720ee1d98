"""An open-loop HTTP client for tests on the real local target, and what the target measured
over the same interval.

Requests leave on a fixed schedule whatever the answers, each on an idle keep-alive connection or
a new one; latency is measured from the scheduled time, so a queue above capacity shows as it
grows.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil

from autotune.targets import ProxyUsage
from autotune.targets.local import LocalTarget


@dataclass(frozen=True)
class Run:
    """What the open-loop client saw, and what the target measured over the same interval."""

    latencies_ms: list[float]  # of the 200s, from the scheduled send time
    statuses: dict[int, int]  # status → count; 0 = connection error
    usage: ProxyUsage
    upstream_cpu_s: float

    def p95(self) -> float:
        return statistics.quantiles(self.latencies_ms, n=100)[94]

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        """Requests that did not get a 200 (an error status or a broken connection)."""
        return self.sent - self.statuses.get(200, 0)

    def counters(self) -> dict[str, float]:
        """Envoy's counters that moved in the window (for messages)."""
        return {k: v for k, v in self.usage.extra.items() if v}


async def open_loop(url: str, rps: float, seconds: float) -> tuple[list[float], dict[int, int]]:
    """Send ``GET /`` at ``rps`` for ``seconds`` on schedule; latencies of the 200s (ms, from
    the scheduled time) and the count per status (0: the connection broke)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened: list[asyncio.StreamWriter] = []
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one(scheduled: float) -> None:
        conn = idle.pop() if idle else None
        status = 0
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
                opened.append(conn[1])
            reader, writer = conn
            writer.write(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if status == 200:
                latencies.append((time.monotonic() - scheduled) * 1000)
            idle.append(conn)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            status = 0
        statuses[status] = statuses.get(status, 0) + 1

    start = time.monotonic()
    tasks = []
    for i in range(int(rps * seconds)):
        scheduled = start + i / rps
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    for writer in opened:
        writer.close()
    return latencies, statuses


def upstream_cpu_s(target: LocalTarget) -> float:
    """CPU seconds the upstream endpoints have used so far."""
    total = 0.0
    for pid in target.endpoint_pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def run_open_loop(target: LocalTarget, rps: float, seconds: float = 3.0) -> Run:
    """One measurement window of ``seconds`` of open-loop load at ``rps`` through the target."""
    cpu0 = upstream_cpu_s(target)
    target.begin_window()
    latencies, statuses = asyncio.run(open_loop(target.load_url, rps, seconds))
    usage = target.end_window()
    return Run(latencies, statuses, usage, upstream_cpu_s(target) - cpu0)
