"""`rankgate policy`: check the consent and purpose policy files, deploy them live."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.options import CONFIG_OPTION, FOLDER_ARGUMENT
from rankgate.cli.render import fails_cleanly, say
from rankgate.ops.routing import check_policy, deploy_policy


@click.group()
def policy() -> None:
    """Consent and purpose policy files (policies/): check them, deploy them live."""


@policy.command("check")
@FOLDER_ARGUMENT
@fails_cleanly
def policy_check(folder: Path | None) -> None:
    """Validate policy.yaml and fallback.yaml of FOLDER (default: the project's policies),
    with their item ids against the project's catalogue."""
    checked = check_policy(folder)
    click.echo(
        f"{checked.folder}: policy {checked.policy.version}, fallback {checked.fallback.version}, "
        f"digest {checked.digest}: valid"
    )


@policy.command("deploy")
@FOLDER_ARGUMENT
@CONFIG_OPTION
@fails_cleanly
def policy_deploy(folder: Path | None, config_path: Path | None) -> None:
    """Check FOLDER's policy files, then serve them: the config names the folder and the
    digest of the files checked, and the running server re-reads them in place. A file
    with an error is refused here, and by the server, which keeps its current policy."""
    deploy_policy(folder, config_path, say)
