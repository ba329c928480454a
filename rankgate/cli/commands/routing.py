"""`rankgate model` commands about routing: which version serves whom (promote,
retire, rollback), the audit of those changes (history), and how it goes (status)."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.options import CONFIG_OPTION, FORCE_OPTION
from rankgate.cli.render import echo_lines, fails_cleanly, say
from rankgate.ops.routing import chosen_role, history, promote, retire, rollback, status


@click.command("promote")
@click.argument("version")
@click.option(
    "--canary",
    "canary",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    default=None,
    help="Send PCT % of users to VERSION.",
)
@click.option("--stable", "stable", is_flag=True, help="Make VERSION the stable version.")
@click.option(
    "--shadow",
    "shadow",
    is_flag=True,
    help="Score a copy of requests with VERSION, off the response path.",
)
@click.option(
    "--alternate",
    "alternate",
    is_flag=True,
    help="Let VERSION serve purposes that may not use the stable version's feature views.",
)
@FORCE_OPTION
@CONFIG_OPTION
@fails_cleanly
def model_promote(
    version: str,
    canary: float | None,
    stable: bool,
    shadow: bool,
    alternate: bool,
    force: bool,
    config_path: Path | None,
) -> None:
    """Change VERSION's role in the routing and apply it to the running server.

    Shows which purposes each version serves before and after, and refuses a change
    that leaves users of a purpose without a permitted model, unless --force; so too,
    with `drift.block_promotion` in the serve config, a version with a drift flag."""
    role = chosen_role(canary, stable, shadow, alternate)
    promote(version, role, canary, force, config_path, say)


@click.command("approve")
@click.argument("version")
@click.option("--by", "by", required=True, help="Who approves: a name on the policy's approvers.")
@click.option(
    "--purpose",
    "purposes",
    multiple=True,
    required=True,
    help="The purpose approved for (repeat for several).",
)
@click.option("--note", default="", help="What the approver wants on record with it.")
@CONFIG_OPTION
@fails_cleanly
def model_approve(
    version: str, by: str, purposes: tuple[str, ...], note: str, config_path: Path | None
) -> None:
    """Approve VERSION for a purpose whose policy requires it before `promote` gives
    it traffic. Shows, and stores with the approval, the off-policy estimate against
    stable and the drift figures at this moment."""
    from rankgate.ops.approvals import approve

    echo_lines(approve(version, by, list(dict.fromkeys(purposes)), note, config_path, say).lines())


@click.command("retire")
@click.argument("version")
@FORCE_OPTION
@CONFIG_OPTION
@fails_cleanly
def model_retire(version: str, force: bool, config_path: Path | None) -> None:
    """Take VERSION out of the routing (it stays in the model store) and apply it.

    Refused for the stable version, and when a purpose would lose its permitted
    model, unless --force."""
    retire(version, force, config_path, say)


@click.command("rollback")
@FORCE_OPTION
@CONFIG_OPTION
@fails_cleanly
def model_rollback(force: bool, config_path: Path | None) -> None:
    """Take the canary out (stable serves everyone) and apply it; a canary that was an
    alternate or a shadow before its promotion gets that role back."""
    rollback(force, config_path, say)


@click.command("history")
@click.option("--count", default=20, show_default=True, type=click.IntRange(1, 10_000))
@fails_cleanly
def model_history(count: int) -> None:
    """The audit of routing changes: promotions, retirements and rollbacks (automatic
    ones with their rule), newest last, with forced changes and their evidence."""
    echo_lines(history(count))


@click.command("status")
@CONFIG_OPTION
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="How far back shadows are evaluated off-policy on the audit log.",
)
@fails_cleanly
def model_status(config_path: Path | None, since: str) -> None:
    """Routing, drift per version (rows in the window, the most drifted inputs, score
    and explanation drift, flags), automatic rollbacks (which rule fired, with what
    figures), shadow agreement and each shadow's off-policy click-rate estimate
    against stable, and the outcomes joined to each version's decisions (CTR)."""
    echo_lines(status(config_path, since))
