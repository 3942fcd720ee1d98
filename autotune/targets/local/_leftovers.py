"""What a local target leaves if its process is killed, and the sweep that removes it on the next start.

Each ``LocalTarget`` keeps a small JSON ledger (``<tmp>/autotune-state/local-<pid>-<token>.json``)
of the processes, cgroups and temporary directories it made, with its own pid and start time.
Children die with their parent (``_process.die_with_parent``); the ledger catches what that cannot
(a cgroup, a directory, a child on a system without the parent-death signal). ``sweep`` removes
what the ledgers of dead owners list, and the ``autotune-<pid>-…`` cgroups and
``autotune-local-<pid>-…`` directories of dead pids. A live owner's things are never touched;
a pid is "the same process" only if its start time matches (no harm from pid reuse).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from autotune.targets.local._cgroup import NAME_PREFIX, kill_and_remove, list_autotune_cgroups

logger = logging.getLogger(__name__)

#: Prefix of a local target's temporary directory, followed by ``<pid>-``.
TMP_PREFIX = "autotune-local-"
_OWNED = re.compile(r"^(?:" + re.escape(TMP_PREFIX) + "|" + re.escape(NAME_PREFIX) + r"-)(\d+)-")


def state_dir() -> Path:
    """Where the ledgers live (under the system temp directory)."""
    return Path(tempfile.gettempdir()) / "autotune-state"


def _start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def _same_process(pid: int, start_time: float | None) -> bool:
    """True if ``pid`` runs now and (when known) started at ``start_time``."""
    now = _start_time(pid)
    if now is None:
        return False
    return start_time is None or abs(now - start_time) < 0.5


@dataclass
class Ledger:
    """The record of one target's processes, cgroups and directories, rewritten at each change."""

    path: Path = field(default_factory=lambda: state_dir() / f"local-{os.getpid()}-{secrets.token_hex(4)}.json")
    pids: dict[int, float | None] = field(default_factory=dict)
    cgroups: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def add_pid(self, pid: int) -> None:
        self.pids[pid] = _start_time(pid)
        self._write()

    def add_cgroup(self, dirs: tuple[Path, ...]) -> None:
        self.cgroups.extend(str(d) for d in dirs)
        self._write()

    def add_dir(self, path: Path) -> None:
        self.dirs.append(str(path))
        self._write()

    def _write(self) -> None:
        body = {"owner": os.getpid(), "owner_start": _start_time(os.getpid()),
                "pids": [[p, t] for p, t in self.pids.items()], "cgroups": self.cgroups, "dirs": self.dirs}
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(self.path)
        except OSError as exc:
            logger.warning("cannot write the leftovers ledger %s: %s", self.path, exc)

    def discard(self) -> None:
        """Forget the ledger (everything it lists was released)."""
        self.path.unlink(missing_ok=True)


def sweep() -> list[str]:
    """Remove what dead owners left: their recorded processes (SIGKILL to the process group),
    cgroups and directories, then unrecorded ``autotune-<pid>-`` cgroups and temp dirs of dead
    pids. Returns one line per thing removed. Never raises."""
    removed: list[str] = []
    folder = state_dir()
    for path in sorted(folder.glob("local-*.json")) if folder.is_dir() else []:
        try:
            body: dict[str, Any] = json.loads(path.read_text())
            if _same_process(int(body["owner"]), body.get("owner_start")):
                continue
            removed += _sweep_one(body)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("unreadable leftovers ledger %s (%s); removing it", path, exc)
        path.unlink(missing_ok=True)
    for cg in list_autotune_cgroups():
        if _dead_owner(cg.name):
            kill_and_remove(cg)
            removed.append(f"cgroup {cg}")
    for d in Path(tempfile.gettempdir()).glob(TMP_PREFIX + "*"):
        if d.is_dir() and _dead_owner(d.name):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"directory {d}")
    if removed:
        logger.warning("removed what a crashed autotune run left: %s", "; ".join(removed))
    return removed


def _dead_owner(name: str) -> bool:
    m = _OWNED.match(name)
    return m is not None and not psutil.pid_exists(int(m.group(1)))


def _sweep_one(body: dict[str, Any]) -> list[str]:
    removed = []
    for pid, start in body.get("pids", []):
        if _same_process(int(pid), start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
            removed.append(f"process {pid}")
    for d in body.get("cgroups", []):
        if Path(d).is_dir():
            kill_and_remove(Path(d))
            removed.append(f"cgroup {d}")
    for d in body.get("dirs", []):
        if Path(d).is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"directory {d}")
    return removed
