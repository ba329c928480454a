"""`rankgate keys`: API keys per application, scoped to purposes."""

from __future__ import annotations

import click

from rankgate.cli.render import fails_cleanly
from rankgate.governance.api_keys import ApiKey
from rankgate.ops.access import create_key, list_keys, revoke_keys


@click.group()
def keys() -> None:
    """API keys: per application, scoped to purposes, stored hashed."""


@keys.command("create")
@click.argument("app")
@click.option(
    "--purpose",
    "purposes",
    multiple=True,
    required=True,
    help="A purpose of policies/policy.yaml the key may ask for (repeatable).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["events", "identify"]),
    help="Another kind of call the key may make: events (POST /v1/events), identify "
    "(POST /v1/identify and /v1/unlink).",
)
@fails_cleanly
def keys_create(app: str, purposes: tuple[str, ...], scopes: tuple[str, ...]) -> None:
    """Create a key for APP; it is printed once, as the last word."""
    key = create_key(app, purposes, scopes)
    granted = f"purposes: {', '.join(sorted(set(purposes)))}"
    if scopes:
        granted += f"; scopes: {', '.join(sorted(set(scopes)))}"
    click.echo(f"created an API key for {app} ({granted}).")
    click.echo("It is shown only this once; callers send it as 'Authorization: Bearer <key>':")
    click.echo(key)


@keys.command("list")
@fails_cleanly
def keys_list() -> None:
    """Applications, their purposes and key hints (never the keys)."""
    entries = list_keys()
    if not entries:
        click.echo("no API keys: create one with `rankgate keys create APP --purpose P`")
        return
    click.echo(f"{'app':<24} {'key':<10} {'created':<26} purposes")
    for entry in entries:
        click.echo(_key_row(entry))


def _key_row(entry: ApiKey) -> str:
    purposes = ", ".join(sorted(entry.purposes))
    if entry.scopes:
        purposes += f" (scopes: {', '.join(sorted(entry.scopes))})"
    return f"{entry.app:<24} {entry.hint + '…':<10} {entry.created_at:<26} {purposes}"


@keys.command("revoke")
@click.argument("app")
@fails_cleanly
def keys_revoke(app: str) -> None:
    """Revoke every key of APP; running servers stop accepting them within a second."""
    count = revoke_keys(app)
    click.echo(f"revoked {count} key{'s' if count != 1 else ''} of {app}")
