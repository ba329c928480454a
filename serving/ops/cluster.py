"""Past one machine: publish what replicas serve, and render a cluster's serve config.

    rankgate publish --store s3://bucket/rankgate           the home -> the artifact store
    rankgate cluster config --store s3://bucket/rankgate    a serve config for a cluster

A cluster's replicas see neither the operator's home nor the project folder
(docs/cluster.md). `publish` copies what they read from the home
to the artifact store (model_store/artifacts.py): the namespace, the Feast
registry, the serving tables and every model version. `cluster config` writes a
serve config that needs nothing else: the store's URI in the application's
environment, the project's files in its args and the policy files in the
ingress's user_config (rankgate/core/project_files.py). It is what `serve deploy` sends to
a cluster's dashboard, or what a KubeRay RayService embeds as `serveConfigV2`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.applied import AppliedView
from features.tables import serving_files
from model_store.artifacts import ArtifactStore
from model_store.store import DEFAULT_MODEL_NAME, ModelStore
from rankgate.core.errors import ConfigError
from rankgate.core.home import Home
from rankgate.core.project import Project
from rankgate.core.project_files import project_files
from rankgate.governance.policy import load_policy_set
from serving.ops.launch import SERVE_CONFIG, optimize_level
from serving.ops.serve_config import ServeConfig, render

Say = Callable[[str], None]


@dataclass
class Published:
    files: dict[str, str] = field(default_factory=dict)
    """Serving table role -> sha256."""
    registry: bool = False
    """The home's registry was copied (False: Feast already keeps it in the store)."""
    versions: list[str] = field(default_factory=list)
    """Versions uploaded now."""
    present: list[str] = field(default_factory=list)
    """Versions the store already held, unchanged."""


def minimized_log(project: Project, path: Path, folder: Path) -> Path:
    """What the popularity fallback reads of the interaction log: its item and outcome
    columns only. No user key leaves the home, so the store and the nodes' caches
    hold nothing of a person that erasure would have to reach."""
    from features.tables import read_table

    log = project.spec.interactions
    assert log is not None
    target = folder / "interactions.parquet"
    read_table(path, [log.item_column, log.outcome_column]).to_parquet(target, index=False)
    return target


def publish(
    home: Home,
    project: Project,
    views: Sequence[AppliedView],
    store: ArtifactStore,
    model_name: str = DEFAULT_MODEL_NAME,
    say: Say = lambda _line: None,
) -> Published:
    """Copy what replicas read from `home` to `store`: idempotent, versions immutable."""
    published = Published()
    store.publish_home(home)
    local_registry = home.feast_dir / "registry.db"
    if local_registry.exists():
        store.publish_registry(local_registry)
        published.registry = True
    elif not store.has_registry():
        raise ConfigError(f"{home.root} has no Feast registry: run `rankgate setup` first")
    files = serving_files(project, views, home.data_dir)
    with tempfile.TemporaryDirectory(prefix="rankgate-publish-") as scratch:
        if "interactions" in files:
            files["interactions"] = minimized_log(project, files["interactions"], Path(scratch))
        published.files = store.publish_files(files)
    models = ModelStore(home, model_name)
    for version in models.versions():
        if store.publish_version(models, version):
            published.versions.append(version)
            say(f"published model {model_name}/{version}")
        else:
            published.present.append(version)
    return published


def dump(document: dict[str, Any]) -> str:
    """YAML of a rendered config (the carried files as literal blocks)."""
    return render(document)


def cluster_config(
    project: Project,
    store: str,
    base: Path = SERVE_CONFIG,
    host: str = "0.0.0.0",
    port: int | None = None,
    replicas: int | None = None,
    env_vars: dict[str, str] | None = None,
    max_per_node: int | None = None,
) -> dict[str, Any]:
    """`base` made self-contained for a cluster: nothing in it names a local path.

    The project's files (its policies included) go into the application's args, the
    checked policies' digest into RankIngress's user_config, RANKGATE_STORE into the
    application's runtime_env; `env_vars` are added there too."""
    config = ServeConfig.read(base).as_plain()
    document, app, ingress = config.document, config.application, config.ingress
    http = document.setdefault("http_options", {})
    http["host"] = host
    if port is not None:
        http["port"] = port
    app.setdefault("args", {})["project"] = project_files(project)
    checked = load_policy_set(project.policies)
    if replicas is not None:
        ingress["num_replicas"] = replicas
    if max_per_node is not None:  # spreads the replicas: a lost node takes one of them
        ingress["max_replicas_per_node"] = max_per_node
    user_config = ingress.setdefault("user_config", {})
    # The policy files travel with the project (args.project: the event consumer reads
    # them too); the digest pins them. `rankgate policy deploy --config` puts newer
    # files into this section, which replicas then serve in place.
    user_config["policy"] = {"revision": checked.digest}
    # Python's optimized mode as on one machine (serving/ops/launch.py), without the
    # home's bytecode folder: a node has no such folder.
    optimize = optimize_level()
    runtime_env = app.setdefault("runtime_env", {})
    runtime_env.setdefault("env_vars", {}).update(
        {
            **({"PYTHONOPTIMIZE": optimize} if optimize else {}),
            "RANKGATE_STORE": store,
            **(env_vars or {}),
        }
    )
    return config.document
