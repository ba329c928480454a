"""`rankgate model`: versioned ranker models. This module holds the commands about
versions (train, register, reference, validate, list); the routing commands
(promote, retire, rollback, history, status) are in routing.py, the off-policy
evaluation in evaluate.py, the promotion report in report.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from rankgate.cli.commands.evaluate import model_evaluate
from rankgate.cli.commands.report import model_report
from rankgate.cli.commands.routing import (
    model_approve,
    model_history,
    model_promote,
    model_retire,
    model_rollback,
    model_status,
)
from rankgate.cli.options import FEATURES_OPTION, file_option
from rankgate.cli.render import echo_lines, echo_table, fails_cleanly, say
from rankgate.core.errors import RankgateError
from rankgate.ops.models import (
    MODEL_TABLE_HEADER,
    DeclaredData,
    add_drift_reference,
    add_item_embeddings,
    add_lineage,
    list_models,
    register_model,
    train_model,
    trained_summary,
    validate_model,
)

if TYPE_CHECKING:
    from model_store.train import Trainer


@click.group()
def model() -> None:
    """Versioned ranker models."""


@click.command("train")
@click.option("--version", "version", required=True, help="New version name, e.g. v3.")
@click.option(
    "--trainer",
    type=click.Choice(["lightgbm", "logistic_regression"]),
    default="lightgbm",
    show_default=True,
    help="LightGBM trees, or scikit-learn's LogisticRegression on standardized inputs.",
)
@click.option("--params", default=None, help="The trainer's settings: key=value,key=value.")
@FEATURES_OPTION
@fails_cleanly
def model_train(
    version: str, trainer: Trainer, params: str | None, features_path: Path | None
) -> None:
    """Train a model on the project's interaction log (LightGBM, or a logistic
    regression), convert it to ONNX and register it (the same checks as `model
    register`). Default inputs: those of the project's last setup model."""
    manifest = train_model(version, trainer, params, features_path, say)
    click.echo(trained_summary(version, manifest))


@click.command("register")
@click.argument("version")
@file_option(
    "--onnx",
    "onnx_path",
    required=True,
    help="The ONNX model: one float input (rows, inputs), a probability or score output.",
)
@file_option(
    "--features",
    "features_path",
    required=True,
    help="FEATURES.yaml: its inputs in ONNX column order.",
)
@file_option(
    "--booster",
    help="The native tree model it was converted from (LightGBM .txt, XGBoost .json, "
    "scikit-learn .joblib): checked for parity, explained with SHAP.",
)
@file_option(
    "--metrics",
    "metrics_path",
    help="JSON or YAML of held-out metrics by name (`auc` and `log_loss` are checked; "
    "any others, e.g. ndcg@10, are kept as numbers), in the manifest and `model list`.",
)
@file_option(
    "--item-embeddings",
    "item_embeddings",
    help="Parquet or CSV of item vectors for retrieval (the item key column, then a "
    "list column or one column per dimension); default: distilled from the model.",
)
@click.option(
    "--trained-on",
    default=None,
    metavar="FROM..TO",
    help="The times of the rows it learned from: two ISO 8601 times (UTC without an offset); "
    "`model evaluate` warns when they overlap the slots it evaluates on.",
)
@click.option(
    "--data-regions",
    default=None,
    metavar="EU,US",
    help="The regions of the people in its training data (its lineage): residency rules "
    "in policy.yaml decide by them which requests it may answer. Without it: no lineage "
    "recorded, and no region with a residency rule accepts it.",
)
@click.option(
    "--cleared-for-transfer",
    default=None,
    metavar="US",
    help="Of --data-regions, those whose people's data was cleared for transfer to other regions.",
)
@click.option(
    "--training-rows",
    type=int,
    default=None,
    help="How many rows it learned from (with --data-regions).",
)
@click.option(
    "--data-file",
    "data_files",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="A table it was trained on (repeat for each): its sha256, read in chunks, goes "
    "into the lineage (with --data-regions).",
)
@fails_cleanly
def model_register(
    version: str,
    onnx_path: Path,
    features_path: Path,
    booster: Path | None,
    metrics_path: Path | None,
    item_embeddings: Path | None,
    trained_on: str | None,
    data_regions: str | None,
    cleared_for_transfer: str | None,
    training_rows: int | None,
    data_files: tuple[Path, ...],
) -> None:
    """Register a ranker trained anywhere as VERSION, after checking it against the
    project's Feast registry; registered versions are never overwritten."""
    echo_lines(
        register_model(
            version,
            onnx_path,
            features_path,
            booster,
            metrics_path,
            item_embeddings,
            trained_on,
            DeclaredData(data_regions, cleared_for_transfer, training_rows, list(data_files)),
        ).lines()
    )


@click.command("reference")
@click.argument("version")
@fails_cleanly
def model_reference(version: str) -> None:
    """Give VERSION, registered before drift references existed, its drift reference:
    the project's interaction log built with its inputs, its scores and (with a native
    model) mean |SHAP| per feature group; added to its manifest with its hash."""
    click.echo(add_drift_reference(version))


@click.command("retrieval")
@click.argument("version")
@file_option(
    "--item-embeddings",
    "item_embeddings",
    help="Parquet or CSV of item vectors (the item key column, then a list column or "
    "one column per dimension); default: distilled from the model.",
)
@fails_cleanly
def model_retrieval(version: str, item_embeddings: Path | None) -> None:
    """Give VERSION, registered before retrieval existed, its item embeddings for
    requests without candidates (docs/retrieval.md): distilled from its ranker on the
    project's interaction log; added to its manifest with its hash."""
    click.echo(add_item_embeddings(version, item_embeddings))


@click.command("lineage")
@click.argument("version")
@fails_cleanly
def model_lineage(version: str) -> None:
    """Give VERSION, trained by `model train` before lineage existed, its lineage (the
    regions of the people in its training data, its rows, its input tables' sha256),
    read from the project's interaction log once its rows are shown to be the ones it
    was trained on (the training matrix's fingerprint)."""
    click.echo(add_lineage(version))


@click.command("validate")
@click.argument("version")
@fails_cleanly
def model_validate(version: str) -> None:
    """Recheck hashes, ONNX/native parity and features of a version."""
    report = validate_model(version)
    for name, passed, detail in report.checks:
        click.echo(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
    if not report.ok:
        raise RankgateError(
            f"model version {version!r} is invalid: " + "; ".join(report.failures())
        )
    click.echo(f"{version}: valid")


@click.command("list")
@fails_cleanly
def model_list() -> None:
    """Show the registered versions and their state."""
    rows = list_models()
    if not rows:
        click.echo("no model versions registered (run `rankgate setup`)")
        return
    echo_table(MODEL_TABLE_HEADER, rows)


for command in (
    model_train,
    model_register,
    model_reference,
    model_retrieval,
    model_lineage,
    model_validate,
    model_list,
    model_promote,
    model_approve,
    model_retire,
    model_rollback,
    model_evaluate,
    model_report,
    model_history,
    model_status,
):
    model.add_command(command)
