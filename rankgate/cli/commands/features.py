"""`rankgate features`: the project's Feast repository and its online store."""

from __future__ import annotations

import click

from rankgate.cli.render import fails_cleanly
from rankgate.ops.setup import apply_features, materialize_features


@click.group()
def features() -> None:
    """The project's Feast repository (applied to this home) and its Redis online store."""


@features.command("apply")
@fails_cleanly
def features_apply() -> None:
    """Register entities and feature views in the home's Feast registry."""
    views = apply_features()
    click.echo(f"applied {len(views)} feature views: {', '.join(views)}")


@features.command("materialize")
@fails_cleanly
def features_materialize() -> None:
    """Load the latest feature values into the Redis online store (every view but the
    streaming ones, which the event stream keeps fresh)."""
    done = materialize_features()
    click.echo(
        f"materialized {len(done.views)} feature views into the online store: "
        f"{', '.join(done.views)}"
    )
    if done.streaming:
        click.echo(f"not materialized (streaming): {', '.join(done.streaming)}")
