"""The soak's multi-node variant: a Ray cluster of a head and worker nodes on this host.

`ray.cluster_utils.Cluster` starts each node as its own raylet (and the head's GCS
and dashboard), as `tests/deploy/test_cluster.py` does. The head holds Serve's
controller, the HTTP proxy and the event consumer; each worker node one RankIngress
replica (`max_replicas_per_node: 1`). The config is `rankgate cluster config`'s
(serving/ops/cluster.py): the project travels inside it, the models and the Feast
registry come from a store the home is published to (`file://<home>/soak/store`),
and every node's `RANKGATE_HOME` and `RANKGATE_PROJECT` name empty folders of its
own, so a replica serves only what it fetched into its node's cache.

The fault it adds (`node_loss`, loadtests/soak/faults.py) removes a worker node
with its processes (`remove_node(allow_graceful=False)`), then adds a new one with
an empty cache. Promotions and policy deploys go through the CLI as on one
machine: the server is recorded in `<home>/ray/server.json` with the cluster's
config as its base.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench import memory
from model_store.artifacts import ArtifactStore
from rankgate.core.home import Home
from rankgate.core.redis_server import resolve_redis_url
from rankgate.ops.environment import Environment
from serving.ops.cluster import cluster_config, publish
from serving.ops.launch import (
    derived_config,
    free_port,
    project_serve_config,
    ray_client_env,
    serve_deploy_command,
    serve_env,
)
from serving.ops.serve_config import render
from serving.ops.supervisor import ServerInfo

READY_LIMIT_S = 300.0
HEAD_RESOURCE, WORKER_RESOURCE = "rankgate_head", "rankgate_worker"
"""Custom resources that place a one-host cluster's actors: the event consumer on the
head, a RankIngress replica on each worker node."""


def head_node_args(dashboard_port: int, env_vars: dict[str, str]) -> dict[str, Any]:
    """`Cluster(head_node_args=...)` of a one-host cluster: one CPU, the dashboard that
    `serve deploy` talks to, the head's resource and its environment."""
    return {
        "num_cpus": 1,
        "resources": {HEAD_RESOURCE: 1},
        "include_dashboard": True,
        "dashboard_port": dashboard_port,
        "env_vars": env_vars,
    }


def worker_node_args(env_vars: dict[str, str]) -> dict[str, Any]:
    """`Cluster.add_node(...)` arguments of a worker node: one CPU, the worker resource."""
    return {"num_cpus": 1, "resources": {WORKER_RESOURCE: 1}, "env_vars": env_vars}


def place_for_one_host(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster serve config (made with `max_per_node=1`) placed for one host: one proxy
    (on the head, which alone can bind the port), the RankIngress replicas on the worker
    nodes, the consumer on the head, and each audit record written before its answer (a
    node lost takes none along)."""
    config["proxy_location"] = "HeadOnly"
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "RankIngress":
            deployment["ray_actor_options"] = {
                "num_cpus": 0.5,
                "resources": {WORKER_RESOURCE: 1},
            }
            user_config = deployment.setdefault("user_config", {})
            user_config.setdefault("audit", {})["before_answer"] = True
        elif deployment["name"] == "EventConsumer":
            deployment["ray_actor_options"] = {
                "num_cpus": 0.25,
                "resources": {HEAD_RESOURCE: 1},
            }
    return config


@dataclass
class Nodes:
    """The cluster's nodes: the head and the worker nodes by name."""

    cluster: Any
    """`ray.cluster_utils.Cluster`."""
    folder: Path
    workers: dict[str, Any] = field(default_factory=dict)
    added: int = 0
    calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = field(default_factory=queue.Queue)
    """Node changes asked for by other threads: Ray's node objects install signal
    handlers, which only the main thread may do, so the main thread makes them."""

    def on_main_thread(self, change: Callable[[], Any]) -> Any:
        if threading.current_thread() is threading.main_thread():
            return change()
        done: Future[Any] = Future()
        self.calls.put((change, done))
        return done.result()

    def serve_calls(self, wait_s: float) -> None:
        """Make the node changes asked for meanwhile (the main thread, while it waits)."""
        try:
            change, done = self.calls.get(timeout=wait_s)
        except queue.Empty:
            return
        try:
            done.set_result(change())
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asked
            done.set_exception(exc)

    def env(self, name: str) -> dict[str, str]:
        """A node's own environment: its cache, and a home and project that are empty."""
        empty = self.folder / name / "nothing-here"
        empty.mkdir(parents=True, exist_ok=True)
        return {
            "RANKGATE_CACHE": str(self.folder / name / "cache"),
            "RANKGATE_HOME": str(empty),
            "RANKGATE_PROJECT": str(empty),
        }

    def add(self) -> str:
        """A new worker node (an empty cache); its name."""
        self.added += 1
        name = f"worker{self.added}"
        self.workers[name] = self.on_main_thread(
            lambda: self.cluster.add_node(**worker_node_args(self.env(name)))
        )
        return name

    def remove(self, name: str) -> None:
        """The node and every process on it gone at once, as a machine lost."""
        node = self.workers.pop(name)
        self.on_main_thread(lambda: self.cluster.remove_node(node, allow_graceful=False))

    def homes(self) -> list[Path]:
        """The `RANKGATE_HOME` of every node that ever ran (processes are found by it)."""
        return sorted(p for p in self.folder.glob("*/nothing-here"))

    def home_of(self, name: str) -> Path:
        return self.folder / name / "nothing-here"

    def pids(self) -> list[int]:
        """Every process of every live node (each node's processes and their trees)."""
        nodes = [self.cluster.head_node, *self.workers.values()]
        roots = [
            info.process.pid
            for node in nodes
            if node is not None
            for infos in node.all_processes.values()
            for info in infos
            if info.process is not None
        ]
        return [pid for root in roots for pid in memory.tree(root)]


def cluster_serve_config(env: Environment, store: str, port: int, replicas: int) -> dict[str, Any]:
    """`rankgate cluster config` of the project, placed for one host: one proxy (on the
    head), a replica per worker node, the consumer on the head."""
    redis_url = resolve_redis_url()
    config = cluster_config(
        env.project,
        store,
        base=project_serve_config(env.project),
        host="127.0.0.1",
        port=port,
        replicas=replicas,
        env_vars={"REDIS_URL": redis_url},
        max_per_node=1,
    )
    return place_for_one_host(config)


def ranks_personalized(base_url: str, body: dict[str, Any], api_key: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        answer = httpx.post(
            f"{base_url}/v1/rank",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=5,
        )
        return answer.status_code == 200 and not answer.json().get("fallback")
    return False


def refuse_a_running_server(home: Home) -> None:
    """The soak starts its own server: a server of `home` that answers is an error. A
    record of one that does not answer /healthz (left by a run that was killed) is
    removed, or every later soak on the home would refuse to start."""
    path = ServerInfo.path(home)
    info = ServerInfo.read(home)
    if info is not None and info.health() is not None:
        raise RuntimeError(
            f"a server of {home.root} is running at {info.base_url} ({path}): the soak "
            "starts its own; stop that one first"
        )
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def started_cluster(
    home: Home, body: dict[str, Any], api_key: str, workers: int = 2
) -> Iterator[tuple[Path, Nodes, int, str]]:
    """A cluster of a head and `workers` worker nodes serving the home's project once
    it ranks `body` personalized: (its config, its nodes, its port, its dashboard);
    shut down (every node) afterwards."""
    from ray.cluster_utils import Cluster

    refuse_a_running_server(home)
    env = Environment.open()
    folder = home.root / "soak" / "cluster"
    store = f"file://{folder / 'store'}"
    publish(env.home, env.project, env.views(), ArtifactStore(store))
    port, dashboard_port = free_port(), free_port()
    base = folder / "cluster.yaml"
    base.write_text(render(cluster_serve_config(env, store, port, workers)))
    nodes = Nodes(None, folder / "nodes")
    nodes.cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args=head_node_args(dashboard_port, nodes.env("head")),
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        for _ in range(workers):
            nodes.add()
        # Deployed as `rankgate model promote` will deploy it (derived_config), so a
        # promotion reconfigures the replicas in place instead of replacing them.
        deployed = derived_config(home, base=base, port=port, host="127.0.0.1", name="soak")
        subprocess.run(
            serve_deploy_command(deployed, dashboard),
            env=ray_client_env(serve_env(home, resolve_redis_url(), config=base)),
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_LIMIT_S
        while not ranks_personalized(base_url, body, api_key):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not rank within {READY_LIMIT_S:.0f}s")
            time.sleep(1.0)
        ServerInfo(base, port, dashboard).write(home)
        yield base, nodes, port, dashboard
    finally:
        ServerInfo.path(home).unlink(missing_ok=True)
        nodes.cluster.shutdown()
