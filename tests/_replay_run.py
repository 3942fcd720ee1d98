"""`autotune study start SPEC` in a process of its own, on the replay target and driver.

For the fault tests that need a real second process (killed with SIGKILL, or two starts at once).
Environment: ``REPLAY_BLOCK_RUN=n`` blocks the n-th load run (1-based) for good, so the process
can be killed there; ``REPLAY_SLEEP_S`` makes each load run take that long. Each load run prints
``LOAD <n> <config>`` to stdout when it starts.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import optuna

import autotune.study as study_api  # the CLI imports run_study from there once the spec has passed
from autotune.cli import main
from autotune.mesh import MeshConfig
from autotune.spec import LoadSpec, StudySpec
from autotune.study import Observer, run_study
from autotune.testing.replay import Landscape, Point, ReplayDriver, ReplayTarget


def point(config: MeshConfig) -> Point:
    """Latency falls and CPU use rises with the CPU limit."""
    p95 = 4.0 + 1.0 / config.effective_cpu_limit
    return Point(p95 * 0.5, p95, p95 * 1.2, cpu_cores=0.05 * config.effective_cpu_limit)


class SlowDriver(ReplayDriver):
    def run(self, url: str, load: LoadSpec, **kw: Any) -> list[Any]:
        n = self.landscape.runs + 1
        print(f"LOAD {n} {self.landscape.applied.describe()}", flush=True)
        if os.environ.get("REPLAY_BLOCK_RUN") == str(n):
            time.sleep(600)
        time.sleep(float(os.environ.get("REPLAY_SLEEP_S", "0")))
        return super().run(url, load, **kw)


def replayed(spec: StudySpec, observer: Observer | None = None) -> optuna.Study:
    land = Landscape.synthetic(point)
    return run_study(spec, observer, ReplayTarget(land), load=SlowDriver(land))


if __name__ == "__main__":
    study_api.run_study = replayed  # type: ignore[assignment]
    main(["study", "start", *sys.argv[1:]], prog_name="autotune")
