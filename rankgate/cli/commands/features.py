"""`rankgate features`: the project's Feast repository and its online store."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.options import file_option
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


@features.command("export")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "version", default=None, help="The inputs of this registered version.")
@file_option("--features", "features_path", exists=True, help="The inputs of this FEATURES.yaml.")
@file_option(
    "--logs",
    "logs_path",
    exists=True,
    help="A log file with the columns rankgate.yaml `interactions` declares (default: the project's log).",
)
@fails_cleanly
def features_export(
    output: Path, version: str | None, features_path: Path | None, logs_path: Path | None
) -> None:
    """Write the interaction log's training matrix to OUTPUT (Parquet): per logged
    impression, the user key, item, time, outcome (position and propensity where the
    log has them) and one float32 column per input, as serving would build it. Inputs:
    --model's or --features' (default: the last setup model's)."""
    from rankgate.ops.models import export_features

    done = export_features(output, version, features_path, logs_path, click.echo)
    click.echo(f"wrote {done.rows:,} rows x {len(done.columns)} columns to {done.path}")
