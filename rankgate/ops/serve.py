"""Serving a project: on this machine or a Ray cluster, and what a cluster reads.

`serve` sets the home up if needed, writes the serve config the server runs
(derived from the project's, or for a cluster with an artifact store: one that
names no local path) and becomes the supervisor of `serve run`. `publish` copies
what a cluster's replicas read to the artifact store; `cluster_serve_config`
renders a serve config for a cluster. Ray, Feast and the serving tables are
imported by serving/ops/cluster.py, loaded when a cluster is addressed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from model_store.artifacts import ArtifactStore
from rankgate.core.settings import get_project
from rankgate.ops.environment import Environment
from rankgate.ops.setup import run_setup
from serving.ops.launch import (
    derived_config,
    exec_serve,
    project_serve_config,
    serve_env,
    server_host,
    stop_on_signals,
)

if TYPE_CHECKING:
    from serving.ops.cluster import Published

Say = Callable[[str], None]


def serve(
    config_path: Path | None,
    port: int | None,
    host: str | None,
    log_format: str,
    say: Say,
    demo_consent: bool = False,
) -> NoReturn:
    """Set up if needed (with the demo consent records when `demo_consent`), then serve
    the project on Ray Serve; this process becomes the supervisor of `serve run` and
    never returns."""
    stop_on_signals()
    run_setup(say, demo_consent=demo_consent)
    env = Environment.open()
    assert env.redis_url is not None
    remote = bool(os.environ.get("RAY_ADDRESS"))
    base = (config_path or project_serve_config(env.project)).resolve()
    if remote and env.settings.store:
        config = _cluster_config_file(env, base, host, port)
    else:
        if remote:
            say(
                "RANKGATE_STORE is not set: the replicas read the home and the project from "
                "their node's filesystem, so every node must see them (docs/cluster.md)"
            )
        config = derived_config(
            env.home,
            base=base,
            port=port,
            runtime_env={
                "RANKGATE_HOME": str(env.home.root),
                "RANKGATE_PROJECT": str(env.project.root),
                "REDIS_URL": env.redis_url,
            }
            if remote
            else None,
            host=host,
            log_format=log_format,
        )
    say(f"serving {config} (Ctrl-C stops)")
    server = serve_env(env.home, env.redis_url, config=base, project=env.project)
    if log_format == "json":  # Ray's own loggers in `serve run` and its workers
        server.setdefault("RAY_LOGGING_CONFIG_ENCODING", "JSON")
    # This process becomes a small supervisor of `serve run` (same process id): what
    # setup imported (Feast, pandas, the trainers) is not kept while the server runs.
    exec_serve(env.home, base, config, server, host=server_host(config), log_format=log_format)


def _cluster_config_file(env: Environment, base: Path, host: str | None, port: int | None) -> Path:
    """A cluster: replicas read the artifact store and the config, never this machine."""
    from serving.ops.cluster import cluster_config, publish

    assert env.redis_url is not None and env.settings.store is not None
    publish(env.home, env.project, env.views(), ArtifactStore(env.settings.store))
    document = cluster_config(
        env.project,
        env.settings.store,
        base,
        host=host
        or yaml.safe_load(base.read_text()).get("http_options", {}).get("host", "0.0.0.0"),
        port=port,
        env_vars={"REDIS_URL": env.redis_url},
    )
    config = env.home.root / "ray" / "serve_config.cluster.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


@dataclass(frozen=True)
class PublishedHome:
    uri: str
    namespace: str
    done: Published

    def summary(self) -> str:
        tables = ", ".join(f"{role} {sha[:12]}" for role, sha in self.done.files.items())
        return (
            f"{self.uri}: namespace {self.namespace}; registry "
            f"{'copied' if self.done.registry else 'already there'}; tables {tables}; "
            f"{len(self.done.versions)} model version(s) published, "
            f"{len(self.done.present)} already there"
        )


def publish_home(store: str, say: Say) -> PublishedHome:
    """Copy what a cluster's replicas serve from the home to the artifact store STORE."""
    from serving.ops.cluster import publish

    env = Environment.open(redis=False)
    target = ArtifactStore(store)
    done = publish(env.home, env.project, env.views(), target, env.models.name, say)
    return PublishedHome(target.uri, env.home.namespace, done)


@dataclass(frozen=True)
class ClusterConfig:
    document: dict[str, Any]
    text: str

    @property
    def store(self) -> str:
        return str(self.document["applications"][0]["runtime_env"]["env_vars"]["RANKGATE_STORE"])


def cluster_serve_config(
    store: str,
    config_path: Path | None,
    replicas: int | None,
    max_per_node: int | None,
    host: str,
    port: int | None,
) -> ClusterConfig:
    """A serve config for a cluster reading STORE, with the project's files inside it."""
    from serving.ops.cluster import cluster_config, dump

    project = get_project()
    document = cluster_config(
        project,
        store,
        config_path or project_serve_config(project),
        host,
        port,
        replicas,
        max_per_node=max_per_node,
    )
    return ClusterConfig(document, dump(document))
