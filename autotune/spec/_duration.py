"""Durations in a spec: a number of seconds, or a string with an explicit, unambiguous unit.

The rule: ``ms``, ``s``, ``min`` and ``h`` are units; a bare number is seconds. A bare ``m`` is
refused: in the same file ``m`` means millicores (``cpuLimit: 500m``), and ``warmup: 600m`` was
meant as 600 ms at least once. Each duration field also has an upper bound (a warm-up of hours is a
typo, not a plan), given where the field is declared.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BeforeValidator

_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "": 1.0}
FORMS = "a number of seconds or a string with a unit: '500ms', '30s', '10min', '1h'"


def parse_duration(value: object) -> float:
    """Seconds in ``value`` (``30``, ``"500ms"``, ``"30s"``, ``"10min"``, ``"1h"``).

    Raises ``ValueError`` stating the rule: unknown or ambiguous unit (``m``), negative, not finite.
    """
    if isinstance(value, bool):
        raise ValueError(f"a duration is {FORMS}; got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
        return float(value)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"a duration is {FORMS}; got {value!r}")
    number, unit = m.groups()
    if unit == "m":
        raise ValueError(f"{value!r} is ambiguous: 'm' means millicores for CPU in this file; "
                         f"write {number}ms or {number}min")
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {value!r}; a duration is {FORMS}")
    return float(number) * _UNITS[unit]


def format_duration(seconds: float) -> str:
    """Short text for a number of seconds, in the unit a user would write (``600`` → ``10min``)."""
    for unit, scale in (("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if seconds >= scale and (seconds / scale).is_integer():
            return f"{seconds / scale:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def duration(*, at_most: float, positive: bool = False) -> Any:
    """Pydantic metadata for a duration field: parse it and check ``0 (<|<=) value <= at_most``.

    Use as ``Annotated[float, duration(at_most=600)]``; the message states the bound and the value.
    """

    def check(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {value!r}")
        if seconds > at_most:
            raise ValueError(f"must be at most {format_duration(at_most)}, got {format_duration(seconds)}"
                             + ("" if isinstance(value, str) else " (a bare number is seconds)"))
        return seconds

    return BeforeValidator(check)
