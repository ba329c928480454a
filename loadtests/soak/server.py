"""The server a soak runs against: one it starts (`started`), or the test session's.

A started server is `serve run` of a copy of the project's serve config in the
home (`<home>/soak/serve_config.yaml`) with `replicas` RankIngress replicas (two by
default: killing one of two is a fault a caller should not see) and
`audit.before_answer: true`, recorded in
`<home>/ray/server.json` as `rankgate serve` records itself, so `rankgate model
promote` and `rankgate policy deploy` apply to it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.bench.systems import wait_ready
from loadtests.ray_metrics import own_processes
from loadtests.soak.cluster import Nodes, refuse_a_running_server, started_cluster
from rankgate.core.home import Home
from rankgate.core.redis_server import resolve_redis_url
from serving.ops.launch import (
    derived_config,
    free_port,
    project_serve_config,
    ray_client_env,
    serve_deploy_command,
    serve_env,
    serve_run_command,
    start_server,
    stop_server,
)
from serving.ops.serve_config import ServeConfig
from serving.ops.supervisor import ServerInfo, dashboard_address


@dataclass
class SoakServer:
    base_url: str
    home: Home
    config: Path
    """The config the server runs (promotions edit it)."""
    log: Path
    process: subprocess.Popen[bytes] | None = None
    """Its `serve run`, whose process tree is the stack the soak samples (None: not known)."""
    nodes: Nodes | None = None
    """The multi-node variant's cluster (loadtests/soak/cluster.py)."""
    dashboard_url: str = ""

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def dashboard(self) -> str:
        if self.dashboard_url:
            return self.dashboard_url
        return dashboard_address(self.log.read_text(errors="replace")) or "http://127.0.0.1:8265"

    def health(self) -> dict[str, Any]:
        """/healthz's answer; empty while the server does not answer it."""
        return ServerInfo(self.config, self.port, "").health() or {}

    def pids(self, marker: str) -> list[int]:
        """This server's processes whose command line has `marker` (on every node)."""
        homes = [self.home.root, *(self.nodes.homes() if self.nodes else [])]
        return [pid for home in homes for pid, _ in own_processes(home, marker.encode())]

    def audit_before_answer(self) -> bool:
        user_config = ServeConfig.read(self.config).ingress.get("user_config", {})
        return bool(user_config.get("audit", {}).get("before_answer", False))

    def replicas(self) -> int:
        return int(ServeConfig.read(self.config).ingress.get("num_replicas", 1))

    def deploy_with_replicas(self, replicas: int) -> None:
        """`serve deploy` of the running config with `replicas` RankIngress replicas
        (what an operator scaling does): Ray reloads HAProxy with the new backends."""
        config = derived_config(self.home, base=self.config, port=self.port, name="soak-scaled")
        scaled = ServeConfig.read(config)
        scaled.ingress["num_replicas"] = replicas
        scaled.write()
        env = serve_env(self.home, resolve_redis_url(), config=self.config)
        subprocess.run(
            serve_deploy_command(config, self.dashboard()),
            env=ray_client_env(env),
            capture_output=True,
            timeout=120,
            check=True,
        )


@contextlib.contextmanager
def started(
    home: Home, body: dict[str, Any], api_key: str, replicas: int = 2, nodes: int = 0
) -> Iterator[SoakServer]:
    """A server of `home` for the soak, once it ranks `body`; stopped (its process
    group, or every node of its cluster) afterwards. `nodes` > 0: a cluster of a head
    and that many worker nodes, a replica on each (loadtests/soak/cluster.py)."""
    if nodes > 0:
        with started_cluster(home, body, api_key, nodes) as (path, cluster, port, dashboard):
            yield SoakServer(
                f"http://127.0.0.1:{port}",
                home,
                path,
                path.parent / "serve.log",
                nodes=cluster,
                dashboard_url=dashboard,
            )
        return
    refuse_a_running_server(home)
    folder = home.root / "soak"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "serve_config.yaml"
    base.write_text(project_serve_config().read_text())
    config = ServeConfig.read(base)
    config.ingress["num_replicas"] = replicas
    # Every answered decision has its record before the answer leaves (docs/cluster.md,
    # Node loss): with the default, a replica killed takes the records it had not
    # written yet with it, which the soak's audit count would (and did) show.
    audit = config.ingress.setdefault("user_config", {}).setdefault("audit", {})
    audit["before_answer"] = True
    config.write()
    port = free_port()
    run_config = derived_config(home, base=base, port=port, name="soak")
    log = folder / "serve.log"
    process = start_server(
        serve_run_command(run_config), serve_env(home, resolve_redis_url(), config=base), log
    )
    server = SoakServer(f"http://127.0.0.1:{port}", home, base, log, process)
    try:
        wait_ready(f"{server.base_url}/v1/rank", body, process, log, api_key, timeout_s=300)
        ServerInfo(base, port, server.dashboard()).write(home)
        yield server
    finally:
        ServerInfo.path(home).unlink(missing_ok=True)
        stop_server(process)
