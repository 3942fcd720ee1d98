"""What the real local target needs on this machine, as skip markers shared by its test modules."""

from __future__ import annotations

import pytest

from autotune.errors import TargetError
from autotune.targets.local._cgroup import detect
from autotune.targets.local._envoy import find_envoy_binary

SUPPORT = detect()
try:
    find_envoy_binary()
    ENVOY_MISSING = ""
except TargetError as exc:
    ENVOY_MISSING = str(exc)

needs_envoy = pytest.mark.skipif(bool(ENVOY_MISSING), reason=ENVOY_MISSING)
needs_cgroup = pytest.mark.skipif(not SUPPORT.available,
                                  reason=f"no writable CPU cgroup: {SUPPORT.reason}")
