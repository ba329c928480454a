"""`rankgate audit` (the decision audit log) and `rankgate privacy` (erasure from it,
and from everything else kept of a person)."""

from __future__ import annotations

import sys

import click

from rankgate.cli.render import echo_lines, fails_cleanly
from rankgate.ops.access import forget
from rankgate.ops.replays import audit_records, replay_decision


@click.group()
def audit() -> None:
    """The decision audit log (a Redis Stream, one record per decision)."""


@audit.command("tail")
@click.option("--count", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--follow", is_flag=True, help="Keep printing new records (Ctrl-C stops).")
@fails_cleanly
def audit_tail(count: int, follow: bool) -> None:
    """Print the most recent decisions, one JSON record per line."""
    echo_lines(record.shown() for record in audit_records(count, follow))


@audit.command("replay")
@click.argument("request_id")
@fails_cleanly
def audit_replay(request_id: str) -> None:
    """Re-score a decision from its recorded features and model version."""
    result = replay_decision(request_id)
    click.echo(f"request {request_id}: {result.message}")
    click.echo(f"  recorded: {result.recorded}")
    if result.replayed:
        click.echo(f"  replayed: {result.replayed}")
    if result.reproduced is False:
        sys.exit(1)


@click.group()
def privacy() -> None:
    """Requests of data subjects, answered from their pseudonymous key."""


@privacy.command("forget")
@click.argument("user_id")
@click.option(
    "--anonymous",
    is_flag=True,
    help="USER_ID is an anonymous id (a cookie or device id of POST /v1/identify).",
)
@fails_cleanly
def privacy_forget(user_id: str, anonymous: bool) -> None:
    """Erase the person of USER_ID under every id linked to them: feature rows,
    consent, audit records, events, streaming states, decisions, offline rows and
    the links. The report has a line per id."""
    click.echo(forget(user_id, anonymous))
