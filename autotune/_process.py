"""The one way autotune stops a child process and quotes what it said last.

Every process autotune starts (Envoy, the upstream endpoints, Locust) runs in its own session
(``start_new_session=True``), so its process group id is its pid: :func:`terminate` can then stop
the process and anything it forked, by that id, without touching any other process. On Linux each
also gets a parent-death signal (:func:`die_with_parent`), so that none outlives autotune when it is
killed without a chance to clean up (SIGKILL, OOM killer).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

#: What :func:`terminate` waits after SIGTERM before it sends SIGKILL.
DEFAULT_GRACE_S = 5.0

_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - a Linux without a loadable libc
        _LIBC = None


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child receive SIGKILL when the
    thread that started it dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``; works together with
    ``start_new_session=True``). If the parent died between ``fork`` and the ``prctl``, the child
    kills itself at once. ``None`` (no hook) where the call does not exist (not Linux).

    The signal follows the *thread* that forked: start long-lived children from a thread that
    lives as long as they should (the main thread, in autotune).
    """
    libc = _LIBC
    if libc is None:
        return None
    parent = os.getpid()

    def _preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return _preexec


def terminate(proc: subprocess.Popen[bytes], grace_s: float = DEFAULT_GRACE_S, *,
              group: bool = False) -> int | None:
    """Stop ``proc``: SIGTERM, wait up to ``grace_s``, then SIGKILL; always reap it.

    With ``group`` the signals go to the process group ``proc.pid`` (the process must have been
    started with ``start_new_session=True``) and, once the leader is gone, the group gets a final
    SIGKILL so that nothing it forked lingers. Never raises for a process that already exited.
    Returns the exit code (``None`` only if the process survived SIGKILL, which is logged).
    """
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM, group)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("pid %s ignored SIGTERM for %.1f s; killing it", proc.pid, grace_s)
            _signal(proc, signal.SIGKILL, group)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - an unkillable process
                logger.error("pid %s survived SIGKILL", proc.pid)
                return None
    if group:
        _signal(proc, signal.SIGKILL, group=True)
    return proc.returncode


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def log_tail(path: Path, lines: int = 10, width: int = 800, prefer: tuple[str, ...] = ()) -> str:
    """The last ``lines`` lines of the log file ``path``, each cut to ``width`` characters.

    With ``prefer`` (substrings such as ``"][error]["``), the last lines containing one of them are
    quoted instead when there are any (an error is usually what the reader needs). Returns ``""``
    for a missing or empty file.
    """
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    all_lines = text.splitlines()
    preferred = [ln for ln in all_lines if any(p in ln for p in prefer)] if prefer else []
    chosen = (preferred or all_lines)[-lines:]
    return "\n".join(ln if len(ln) <= width else ln[:width] + " …" for ln in chosen)


def child_env(drop_prefix: str | None = None) -> dict[str, str]:
    """This process's environment for a Python child that must import this same ``autotune``
    (its source root first on ``PYTHONPATH``), less the variables starting with ``drop_prefix``."""
    env = {k: v for k, v in os.environ.items() if not (drop_prefix and k.startswith(drop_prefix))}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
