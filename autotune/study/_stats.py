"""Robust aggregation of repeated measurements and paired comparisons with a confidence interval."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Metrics aggregated conservatively rather than by the median (see ``aggregate``).
_SUMMED = ("requests", "failures", "window_s")
#: Prefix of the proxy's event counters (503 overflows, retries, ejections): summed over windows.
_COUNTER_PREFIX = "envoy_"


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation (sample std / mean); 0 for fewer than two values or a zero mean."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if arr.size < 2 or arr.mean() == 0:
        return 0.0
    return float(arr.std(ddof=1) / abs(arr.mean()))


def aggregate(windows: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Combine per-window metrics into one value each, plus the spread (CV) of each.

    Medians, except: ``requests``, ``failures``, ``window_s`` and the proxy's ``envoy_*`` event
    counters are summed, ``error_rate`` is failures over requests of all windows, and
    ``throughput_ratio`` and ``cpu_throttled_ratio`` are the worst window's, so a config that fell
    short of the offered load, or ran out of CPU quota, once counts against its constraint.
    """
    if not windows:
        raise ValueError("no windows to aggregate")
    keys = windows[0].keys()
    out: dict[str, float] = {}
    spread: dict[str, float] = {}
    for key in keys:
        values = [float(w[key]) for w in windows]
        finite = [v for v in values if math.isfinite(v)]
        if key in _SUMMED or key.startswith(_COUNTER_PREFIX):
            out[key] = float(sum(values))
        elif key == "throughput_ratio":
            out[key] = min(values)
        elif key == "cpu_throttled_ratio":
            out[key] = max(values)
        else:
            out[key] = float(np.median(finite)) if finite else math.nan
        spread[key] = cv(values)
    if "requests" in out and "failures" in out:
        out["error_rate"] = out["failures"] / out["requests"] if out["requests"] else 1.0
    return out, spread


@dataclass(frozen=True)
class Change:
    """A candidate's change against the baseline over paired rounds, in percent of the baseline."""

    mean_pct: float
    low_pct: float
    high_pct: float
    rounds: int

    def improves(self, direction: str) -> bool:
        """The whole interval lies on the better side (below 0 when minimizing)."""
        return self.high_pct < 0 if direction == "minimize" else self.low_pct > 0


def paired_change(baseline: Sequence[float], candidate: Sequence[float], confidence: float) -> Change:
    """Relative change per round, (B_r − A_r) / A_r, with a Student-t interval over the rounds.

    Pairing rounds cancels slow drift of the machine that affects both alike. With one round the
    interval is unbounded; with zero variance (a deterministic metric such as the CPU limit) it is
    the point itself. Where the baseline measured 0 in some round (no goodput within the SLO
    under a surge, no errors), a per-round ratio does not exist: the per-round differences are
    then taken in percent of the baseline's mean, or of the candidate's mean when the baseline's
    is 0 (so a rise from nothing reads +100 %); both 0 throughout is no change.
    """
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"need equal, non-zero rounds, got {len(baseline)} and {len(candidate)}")
    a_, b_ = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    if np.all(a_ != 0):
        d = (b_ - a_) / a_ * 100.0
    else:
        ref = float(np.mean(a_)) or float(np.mean(b_))
        if ref == 0:
            return Change(0.0, 0.0, 0.0, int(a_.size))
        d = (b_ - a_) / abs(ref) * 100.0
    mean = float(d.mean())
    if d.size == 1:
        return Change(mean, -math.inf, math.inf, 1)
    sem = float(d.std(ddof=1) / math.sqrt(d.size))
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * sem
    return Change(mean, mean - half, mean + half, int(d.size))
