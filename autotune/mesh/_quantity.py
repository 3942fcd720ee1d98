"""Kubernetes CPU and memory quantities: parse to numbers, format back to canonical strings."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_CPU_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(m?)\s*$")
_MEM_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_MEM_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|)\s*$")


def parse_cpu(value: object) -> float:
    """Return the number of cores in a CPU quantity (``"500m"`` → 0.5, ``"2"`` → 2.0, 1.5 → 1.5).

    Raises ``ValueError`` with the rule when the value is not a valid, positive CPU quantity.
    """
    if isinstance(value, bool):
        raise ValueError(f"a CPU quantity must be a number of cores or a string like '500m', got {value!r}")
    if isinstance(value, int | float):
        cores = Decimal(str(value))
        if not cores.is_finite():
            raise ValueError(f"a CPU quantity must be a finite number of cores, got {value!r}")
    else:
        m = _CPU_RE.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError(
                f"a CPU quantity must be cores ('1', '0.5') or millicores ('500m'), got {value!r}"
            )
        try:
            cores = Decimal(m.group(1))
        except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
            raise ValueError(f"cannot parse CPU quantity {value!r}") from exc
        if m.group(2) == "m":
            cores /= 1000
    if cores <= 0:
        raise ValueError(f"a CPU quantity must be greater than 0, got {value!r}")
    if (cores * 1000) % 1 != 0:
        raise ValueError(f"Kubernetes CPU precision is 1m (0.001 cores), got {value!r}")
    return float(cores)


def format_cpu(cores: float) -> str:
    """Canonical Kubernetes spelling of a CPU amount: whole cores as ``"2"``, else millicores."""
    milli = round(cores * 1000)
    if milli % 1000 == 0:
        return str(milli // 1000)
    return f"{milli}m"


def parse_memory(value: object) -> int:
    """Return the number of bytes in a memory quantity (``"128Mi"`` → 134217728; a YAML number such
    as ``1073741824`` is bytes, as Kubernetes reads it).

    Raises ``ValueError`` with the rule when the value is not a valid, positive memory quantity.
    """
    if isinstance(value, bool):
        raise ValueError(f"a memory quantity looks like '128Mi', '1Gi' or a number of bytes, got {value!r}")
    if isinstance(value, int | float):
        amount = Decimal(str(value))
        if not amount.is_finite() or amount <= 0:
            raise ValueError(f"a memory quantity must be greater than 0, got {value!r}")
        return int(amount)
    m = _MEM_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"a memory quantity looks like '128Mi', '1Gi' or a number of bytes, got {value!r}")
    amount = Decimal(m.group(1)) * _MEM_SUFFIX[m.group(2)]
    if amount <= 0:
        raise ValueError(f"a memory quantity must be greater than 0, got {value!r}")
    return int(amount)
