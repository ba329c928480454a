"""Past one machine: `rankgate publish` (the home to the artifact store) and
`rankgate cluster` (a serve config for a cluster)."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.options import STORE_OPTION, file_option, store_uri
from rankgate.cli.render import fails_cleanly, say
from rankgate.ops.serve import cluster_serve_config, publish_home


@click.command()
@STORE_OPTION
@fails_cleanly
def publish(store: str | None) -> None:
    """Copy what a cluster's replicas serve from the home to the artifact store: the
    namespace, the Feast registry, the serving tables and every model version
    (registered versions are immutable there too)."""
    click.echo(publish_home(store_uri(store), say).summary())


@click.group()
def cluster() -> None:
    """Serving on a Ray cluster whose nodes share no filesystem (docs/cluster.md)."""


@cluster.command("config")
@STORE_OPTION
@file_option(
    "--config",
    "config_path",
    exists=True,
    help="Serve config to start from (default: serve_config.yaml).",
)
@click.option(
    "--replicas", type=click.IntRange(1, 1000), default=None, help="RankIngress replicas."
)
@click.option(
    "--max-per-node",
    type=click.IntRange(1, 1000),
    default=None,
    help="At most this many RankIngress replicas on one node (1: a lost node takes one).",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the proxies bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="HTTP port.")
@file_option(
    "--output",
    "-o",
    help="Write it here (default: standard output).",
)
@fails_cleanly
def cluster_config_command(
    store: str | None,
    config_path: Path | None,
    replicas: int | None,
    max_per_node: int | None,
    host: str,
    port: int | None,
    output: Path | None,
) -> None:
    """A serve config for a cluster: the store's URI, the project's files and the
    checked policy files carried inside it, no local path (for `serve deploy`, or a
    RayService's serveConfigV2)."""
    rendered = cluster_serve_config(
        store_uri(store), config_path, replicas, max_per_node, host, port
    )
    if output is None:
        click.echo(rendered.text, nl=False)
    else:
        output.write_text(rendered.text)
        click.echo(f"{output}: serve config for a cluster reading {rendered.store}")
