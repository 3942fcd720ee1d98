"""autotune: tune an Istio mesh's connection-pool and sidecar settings by Bayesian search.

The library API the CLI and the scheduled job call::

    from autotune import load_spec, run_study
    study = run_study(load_spec("search-spaces/local-demo.yaml"))
"""

from __future__ import annotations

from autotune.errors import AutotuneError, SpecError, TargetError, TrialFailed
from autotune.mesh import MeshConfig
from autotune.spec import StudySpec, load_spec, parse_spec

__all__ = [
    "AutotuneError",
    "MeshConfig",
    "SpecError",
    "StudySpec",
    "TargetError",
    "TrialFailed",
    "load_spec",
    "parse_spec",
    "run_single",
    "run_study",
]


def __getattr__(name: str) -> object:
    # The study loop pulls in Optuna and pandas; import it only when asked for.
    if name in ("run_study", "run_single"):
        from autotune import study

        return getattr(study, name)
    raise AttributeError(name)
