"""Per-trial files in Optuna's artifact store, for review in ``autotune dashboard``.

Each measured trial gets: its manifests (``destinationrule.yaml``, ``deployment-patch.yaml``), the
per-window table (``windows.csv``), its latency distribution (``latency.html``, a plotly chart) and
what the proxy reported (``proxy.json``: the response status counts and the observed config —
Envoy's counters are not recorded by the targets, so they are not there).

The latency chart is built from the **per-window percentiles** (p50, p95, p99 of each window):
per-request latencies are not recorded, so it is a three-point distribution per window, not a
full CDF. It says so in its title.

The store is a directory (``FileSystemArtifactStore``); by default ``<resultsDir>/artifacts``
(``study.artifactsDir`` in the spec changes it), which ``autotune dashboard --artifacts-dir`` serves.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import Trial

from autotune.spec import StudySpec
from autotune.study._measure import Measurement

if TYPE_CHECKING:
    import plotly.graph_objects as go

logger = logging.getLogger(__name__)
#: Percentiles each window records, with the probability they stand for.
_PERCENTILES = (("latency_p50_ms", 0.50), ("latency_p95_ms", 0.95), ("latency_p99_ms", 0.99))
#: Content types by file extension, so the browser shows the text instead of downloading it.
_MIMETYPES = {".yaml": "text/plain", ".csv": "text/csv", ".json": "application/json", ".html": "text/html"}


def artifacts_dir(spec: StudySpec) -> Path:
    """The artifact store's directory: ``study.artifactsDir``, else ``<resultsDir>/artifacts``."""
    return Path(spec.study.artifacts_dir or Path(spec.study.results_dir) / "artifacts")


def open_store(directory: Path) -> FileSystemArtifactStore:
    """A file-system artifact store in ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))


def windows_csv(windows: Sequence[Mapping[str, float]]) -> str:
    """The per-window table: one row per measurement window, numbered from 1."""
    if not windows:
        return ""
    columns = list(windows[0])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["window", *columns])
    for i, w in enumerate(windows, start=1):
        writer.writerow([i, *(w.get(c) for c in columns)])
    return out.getvalue()


def latency_figure(windows: Sequence[Mapping[str, float]], title: str) -> go.Figure | None:
    """A plotly figure of each window's latency percentiles as cumulative probability (x: latency
    in ms, y: share of requests at or below it). ``None`` when no window has a percentile."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, w in enumerate(windows, start=1):
        points = [(float(w[k]), p) for k, p in _PERCENTILES if w.get(k) is not None]
        if points:
            fig.add_trace(go.Scatter(x=[x for x, _ in points], y=[p for _, p in points],
                                     mode="lines+markers", name=f"window {i}", line_shape="hv"))
    if not fig.data:
        return None
    fig.update_layout(
        title=f"{title}: latency percentiles per window (p50/p95/p99; per-request latencies not recorded)",
        xaxis_title="latency (ms)", yaxis_title="share of requests ≤ latency", yaxis_range=[0, 1.02],
    )
    return fig


def trial_files(manifests: Mapping[str, str], windows: Sequence[Mapping[str, float]],
                proxy: Mapping[str, object], title: str) -> dict[str, str]:
    """The artifact files of one trial, by file name (empty parts are left out)."""
    files = {name: text for name, text in manifests.items() if text}
    if windows:
        files["windows.csv"] = windows_csv(windows)
        fig = latency_figure(windows, title)
        if fig is not None:
            files["latency.html"] = fig.to_html(include_plotlyjs="cdn", full_html=True)
    if any(proxy.values()):
        files["proxy.json"] = json.dumps(proxy, indent=2, sort_keys=True, default=str) + "\n"
    return files


def upload_trial_files(store: FileSystemArtifactStore, trial: Trial, files: Mapping[str, str]) -> list[str]:
    """Upload ``files`` to the store as artifacts of the running ``trial``; returns their ids.
    Must run before the trial finishes (Optuna refuses attributes on a finished trial)."""
    ids = []
    with tempfile.TemporaryDirectory(prefix="autotune-artifacts-") as tmp:
        for name, text in files.items():
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            ids.append(upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                       mimetype=_MIMETYPES.get(path.suffix)))
    logger.debug("trial %d: %d artifacts uploaded", trial.number, len(ids))
    return ids


def upload_measurement(store: FileSystemArtifactStore, trial: Trial, manifests: Mapping[str, str],
                       m: Measurement) -> list[str]:
    """The loop's one call, after a measured trial is recorded and before it completes: upload its
    manifests, windows, latency chart and proxy report. An upload error is logged, never fatal
    (the trial's record is already complete without its files)."""
    files = trial_files(manifests, m.windows, {"status_counts": m.status_counts, "observed": m.observed},
                        f"trial {trial.number}")
    try:
        return upload_trial_files(store, trial, files)
    except OSError as exc:
        logger.warning("trial %d: could not store its artifacts: %s", trial.number, exc)
        return []
