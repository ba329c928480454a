"""Options and arguments more than one command takes, defined once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from rankgate.core.settings import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])


def file_option(
    *param_decls: str, help: str, exists: bool = False, required: bool = False
) -> Callable[[F], F]:
    """An option naming a file (a Path; not a folder), None when not given."""
    return _path_option(param_decls, help, exists, required, dir_okay=False, file_okay=True)


def folder_option(
    *param_decls: str, help: str, exists: bool = False, required: bool = False
) -> Callable[[F], F]:
    """An option naming a folder (a Path; not a file), None when not given."""
    return _path_option(param_decls, help, exists, required, dir_okay=True, file_okay=False)


def _path_option(
    param_decls: tuple[str, ...],
    help: str,
    exists: bool,
    required: bool,
    *,
    dir_okay: bool,
    file_okay: bool,
) -> Callable[[F], F]:
    path = click.Path(exists=exists, file_okay=file_okay, dir_okay=dir_okay, path_type=Path)
    return click.option(*param_decls, type=path, default=None, required=required, help=help)


FEATURES_OPTION = file_option(
    "--features",
    "features_path",
    exists=True,
    help="FEATURES.yaml: the model's inputs in ONNX column order (Feast references "
    "view:field, context features).",
)

CONFIG_OPTION = file_option(
    "--config",
    "config_path",
    exists=True,
    help="Serve config to edit (default: the one the running server uses, else the project's "
    "serve_config.yaml).",
)

FORCE_OPTION = click.option(
    "--force",
    is_flag=True,
    help="Apply even if a purpose loses its permitted model (its users get the fallback) or the "
    "version lacks the evidence promotion.require_evaluation asks for; recorded in the audit "
    "of routing changes (rankgate model history).",
)

demo_consent_option = click.option(
    "--demo-consent",
    is_flag=True,
    help="Also write made-up consent for the project's demo users (its prepare module's "
    "demo_user_ids(); about half granted, source 'rankgate-demo'), to serve an example. "
    "Never for real people: `rankgate privacy demo-consent remove` removes them.",
)

FOLDER_ARGUMENT = click.argument(
    "folder",
    required=False,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)

STORE_OPTION = click.option(
    "--store",
    default=None,
    help="Artifact store URI (s3://bucket/prefix, gs://bucket/prefix, file:///path); "
    "default: RANKGATE_STORE.",
)


def store_uri(store: str | None) -> str:
    """The --store given, checked, else RANKGATE_STORE; a usage error without either."""
    if store is None:
        store = get_settings().store
        if store is None:
            raise click.UsageError("no artifact store: pass --store URI or set RANKGATE_STORE")
        return store
    try:
        checked = Settings(store=store).store
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="--store") from exc
    assert checked is not None
    return checked
