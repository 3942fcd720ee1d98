"""A CPU cgroup for the local proxy: a hard CPU quota (the sidecar's CPU limit) and its accounting.

Works with cgroup v1 (``cpu`` and ``cpuacct`` controllers, mounted together or apart) and with
cgroup v2 (``cpu`` controller enabled in the parent's ``cgroup.subtree_control``). Every cgroup this
module creates is named ``autotune-<pid>-<random>`` so leftovers can be found and attributed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autotune.errors import TargetError

logger = logging.getLogger(__name__)

#: CFS period written for every quota (µs); Kubernetes uses the same 100 ms.
PERIOD_US = 100_000
#: The kernel refuses quotas below 1 ms per period, i.e. 0.01 cores at a 100 ms period.
MIN_QUOTA_US = 1_000
#: Name prefix of every cgroup autotune creates.
NAME_PREFIX = "autotune"

_MOUNTINFO = Path("/proc/self/mountinfo")
_PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuSample:
    """Cumulative counters of one cgroup at one instant (monotonic clock)."""

    time_monotonic: float
    usage_s: float
    periods: int
    throttled_periods: int
    throttled_s: float


@dataclass(frozen=True)
class CgroupSupport:
    """Whether a writable CPU controller exists here, and where new cgroups are created.

    ``parents`` are the directories a new cgroup is made in: one per v1 hierarchy (``cpu`` first,
    then ``cpuacct`` if mounted apart) or the single v2 parent. ``reason`` says why not when
    ``available`` is false.
    """

    available: bool
    version: Literal[1, 2] | None = None
    parents: tuple[Path, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class _Mount:
    root: str
    mount_point: Path
    fstype: str
    super_options: frozenset[str]


def _mounts() -> list[_Mount]:
    """The cgroup mounts of this process's mount namespace, from ``/proc/self/mountinfo``."""
    mounts = []
    for line in _MOUNTINFO.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(_Mount(root=fields[3], mount_point=Path(fields[4]), fstype=rfields[0],
                             super_options=frozenset(rfields[2].split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Controller list (``"cpu,cpuacct"``; ``""`` for v2) → this process's cgroup path."""
    own = {}
    for line in _PROC_CGROUP.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    return own


def _own_dir(mount: _Mount, own_path: str | None) -> Path:
    """This process's cgroup directory inside ``mount`` (the mount point if it is not visible)."""
    if own_path is None:
        return mount.mount_point
    rel = os.path.relpath(own_path, mount.root) if mount.root != "/" else own_path.lstrip("/")
    if rel.startswith(".."):
        return mount.mount_point
    candidate = mount.mount_point / rel if rel != "." else mount.mount_point
    return candidate if candidate.is_dir() else mount.mount_point


def _v1_parents(mounts: list[_Mount]) -> tuple[Path, ...] | None:
    own = _own_cgroups()
    found: dict[str, Path] = {}
    for m in mounts:
        if m.fstype != "cgroup":
            continue
        for ctl in ("cpu", "cpuacct"):
            if ctl in m.super_options and ctl not in found:
                own_path = next((p for c, p in own.items() if ctl in c.split(",")), None)
                found[ctl] = _own_dir(m, own_path)
    if "cpu" not in found or "cpuacct" not in found:
        return None
    if found["cpu"] == found["cpuacct"]:
        return (found["cpu"],)
    return (found["cpu"], found["cpuacct"])


def _v2_parent(mounts: list[_Mount]) -> tuple[Path | None, str]:
    """A v2 directory whose children get the cpu controller, enabling it if needed."""
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    if not v2:
        return None, "no cgroup2 mount"
    own = _own_cgroups().get("")
    problems = []
    for m in v2:
        for parent in dict.fromkeys([_own_dir(m, own), m.mount_point]):
            controllers = (parent / "cgroup.controllers")
            if not controllers.exists() or "cpu" not in controllers.read_text().split():
                problems.append(f"{parent}: cpu controller not available")
                continue
            subtree = parent / "cgroup.subtree_control"
            if "cpu" in subtree.read_text().split():
                return parent, ""
            try:
                subtree.write_text("+cpu")
                return parent, ""
            except OSError as exc:
                problems.append(f"{parent}: cannot enable +cpu in cgroup.subtree_control "
                                f"({exc.strerror})")
    return None, "; ".join(problems)


def detect() -> CgroupSupport:
    """Find a CPU controller this process can create cgroups in and set quotas on.

    Never raises: the answer says why not (no controller mounted, read-only, not root, …).
    The check is real: a probe cgroup is created, given a quota, and removed.
    """
    try:
        mounts = _mounts()
    except OSError as exc:
        return CgroupSupport(False, reason=f"cannot read {_MOUNTINFO}: {exc.strerror}")
    v1 = _v1_parents(mounts)
    if v1 is not None:
        support = CgroupSupport(True, 1, v1)
    else:
        parent, why = _v2_parent(mounts)
        if parent is None:
            return CgroupSupport(False, reason="no cgroup v1 cpu+cpuacct controllers and no "
                                 f"usable cgroup v2 cpu controller ({why})")
        support = CgroupSupport(True, 2, (parent,))
    try:
        probe = CpuCgroup.create(NAME_PREFIX, support)
    except TargetError as exc:
        return CgroupSupport(False, support.version, support.parents, str(exc))
    try:
        probe.set_quota(1.0)
    except TargetError as exc:
        return CgroupSupport(False, support.version, support.parents, str(exc))
    finally:
        probe.remove()
    return support


def list_autotune_cgroups(pid: int | None = None) -> list[Path]:
    """Cgroups named by autotune (``autotune-*``) under every CPU hierarchy; only those made by
    process ``pid`` when given. Used to check that nothing was left behind."""
    try:
        mounts = _mounts()
    except OSError:
        return []
    prefix = f"{NAME_PREFIX}-{pid}-" if pid is not None else f"{NAME_PREFIX}-"
    dirs: set[Path] = set()
    for m in mounts:
        if m.fstype == "cgroup2" or m.super_options & {"cpu", "cpuacct"}:
            dirs.add(m.mount_point)
    v1 = _v1_parents(mounts)
    dirs.update(v1 or ())
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    for m in v2:
        dirs.add(_own_dir(m, _own_cgroups().get("")))
    found: list[Path] = []
    for d in sorted(dirs):
        try:
            found.extend(p for p in d.iterdir() if p.is_dir() and p.name.startswith(prefix))
        except OSError:
            continue
    return sorted(found)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise TargetError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


@dataclass
class CpuCgroup:
    """One cgroup (in one or two v1 hierarchies, or v2) holding the proxy's processes.

    Not thread-safe. ``remove`` is idempotent; after it the object must not be used again.
    """

    support: CgroupSupport
    dirs: tuple[Path, ...]
    name: str
    _removed: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, name_prefix: str = NAME_PREFIX,
               support: CgroupSupport | None = None) -> CpuCgroup:
        """Make a new, uniquely named cgroup ``<prefix>-<pid>-<random>`` with no quota.

        Raises ``TargetError`` naming the directory when it cannot be made; leaves nothing behind.
        """
        support = support or detect()
        if not support.available:
            raise TargetError(f"no writable CPU cgroup controller: {support.reason}")
        name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        made: list[Path] = []
        try:
            for parent in support.parents:
                d = parent / name
                d.mkdir()
                made.append(d)
        except OSError as exc:
            for d in reversed(made):
                _rmdir(d)
            raise TargetError(f"cannot create cgroup {parent / name}: {exc.strerror} "
                              "(needs root or a delegated cgroup)") from exc
        cg = cls(support=support, dirs=tuple(made), name=name)
        logger.debug("created cgroup %s", ", ".join(map(str, made)))
        return cg

    @property
    def cpu_dir(self) -> Path:
        """Directory with the quota files."""
        return self.dirs[0]

    @property
    def acct_dir(self) -> Path:
        """Directory with the usage counter (``cpuacct`` for v1 mounted apart)."""
        return self.dirs[-1]

    def set_quota(self, cores: float | None) -> None:
        """Limit the cgroup to ``cores`` CPUs (period 100 ms); ``None`` removes the limit.

        Values below 0.01 cores are raised to the kernel's 1 ms minimum quota.
        """
        quota = None if cores is None else max(MIN_QUOTA_US, round(cores * PERIOD_US))
        if self.support.version == 2:
            _write(self.cpu_dir / "cpu.max", f"{quota if quota is not None else 'max'} {PERIOD_US}")
        else:
            _write(self.cpu_dir / "cpu.cfs_period_us", str(PERIOD_US))
            _write(self.cpu_dir / "cpu.cfs_quota_us", str(quota if quota is not None else -1))
        logger.debug("cgroup %s quota %s µs per %s µs", self.name, quota, PERIOD_US)

    def quota_cores(self) -> float | None:
        """The quota in force, read back from the kernel (``None`` = unlimited)."""
        if self.support.version == 2:
            quota, period = (self.cpu_dir / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((self.cpu_dir / "cpu.cfs_quota_us").read_text())
        period_us = int((self.cpu_dir / "cpu.cfs_period_us").read_text())
        return None if quota_us < 0 else quota_us / period_us

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup in every hierarchy."""
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """Processes currently in the cgroup."""
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return sorted(found)

    def sample(self) -> CpuSample:
        """Cumulative CPU time, CFS periods and throttling of the cgroup, now."""
        now = time.monotonic()
        stat = _read_keyed(self.cpu_dir / "cpu.stat")
        if self.support.version == 2:
            return CpuSample(now, stat.get("usage_usec", 0) / 1e6, stat.get("nr_periods", 0),
                             stat.get("nr_throttled", 0), stat.get("throttled_usec", 0) / 1e6)
        usage_ns = int((self.acct_dir / "cpuacct.usage").read_text())
        return CpuSample(now, usage_ns / 1e9, stat.get("nr_periods", 0),
                         stat.get("nr_throttled", 0), stat.get("throttled_time", 0) / 1e9)

    def remove(self) -> None:
        """Move leftover processes to the parent cgroup and delete the cgroup. Idempotent.

        Callers should have stopped the processes; any still alive are moved out, not killed.
        """
        if self._removed:
            return
        for d in reversed(self.dirs):
            if not d.exists():
                continue
            for pid in _read_pids(d):
                try:
                    (d.parent / "cgroup.procs").write_text(str(pid))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        logger.warning("cannot move pid %s out of %s: %s", pid, d, exc.strerror)
            _rmdir(d)
        self._removed = True


def _read_pids(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _rmdir(d: Path, attempts: int = 50) -> None:
    """rmdir a cgroup, retrying while exiting processes still hold it (EBUSY)."""
    for _ in range(attempts):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                logger.warning("cannot remove cgroup %s: %s", d, exc.strerror)
                return
            time.sleep(0.02)
    logger.warning("cannot remove cgroup %s: still busy", d)


def _read_keyed(path: Path) -> dict[str, int]:
    """A ``key value`` per line file (``cpu.stat``) as a dict."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def kill_and_remove(d: Path) -> None:
    """SIGKILL every process in the cgroup directory ``d`` (a leftover of a dead autotune run,
    so nothing in it is anyone else's), wait for them to exit, and remove it. Never raises."""
    for _ in range(100):
        pids = _read_pids(d)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    _rmdir(d)
