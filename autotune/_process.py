"""The one way autotune stops a child process and quotes what it said last.

Every process autotune starts (Envoy, the upstream endpoints, Locust) runs in its own session
(``start_new_session=True``), so its process group id is its pid: :func:`terminate` can then stop
the process and anything it forked, by that id, without touching any other process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

#: What :func:`terminate` waits after SIGTERM before it sends SIGKILL.
DEFAULT_GRACE_S = 5.0


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
