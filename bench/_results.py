"""Shared by the bench scripts: the machine's description and writing a section of RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    """One line: cores, CPU model, kernel, Python."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}, Python {platform.python_version()}"


def write_section(title: str, body: str) -> None:
    """Replace (or append) ``## title`` in bench/RESULTS.md with the body, the machine, the date
    and the command that produced it."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"## {title}\n\nMeasured {stamp} on {machine()}.\nCommand: `{command}`\n\n"
               f"{body.strip()}\n\n")
    replace_section(RESULTS, f"## {title}", section.split("\n", 1)[1])


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace ``heading``'s section of ``path`` (up to the next ``## ``) with ``body``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    new = [heading, "", *body.strip("\n").splitlines(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines += new
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
