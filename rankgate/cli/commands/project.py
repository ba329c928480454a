"""The project and its home: `setup`, `init`, `project`, `users` and `redis`."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.options import demo_consent_option
from rankgate.cli.render import echo_lines, fails_cleanly, say
from rankgate.ops.project_check import check_project
from rankgate.ops.scaffold import parse_sample_size, write_skeleton
from rankgate.ops.setup import (
    feast_exports,
    list_users,
    redis_status,
    run_setup,
    start_redis,
    stop_redis,
)


@click.command()
@click.option(
    "--force",
    is_flag=True,
    help="Redo every step, and retrain the project's setup models, even if nothing changed.",
)
@demo_consent_option
@fails_cleanly
def setup(force: bool, demo_consent: bool) -> None:
    """Prepare everything the server needs from the project's sources; safe to run again
    (redoes what changed since the last run, and says what)."""
    run_setup(say, force=force, demo_consent=demo_consent)


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Project name (default: the folder's name).")
@click.option(
    "--sample-size",
    default=None,
    metavar="people=N,items=M,impressions=L",
    help="Size of the generated sample shop (default people=300,items=40,impressions=6000), "
    "e.g. people=1000000,items=100000,impressions=1e7.",
)
@fails_cleanly
def init(folder: Path, name: str | None, sample_size: str | None) -> None:
    """Write a new project skeleton into FOLDER: rankgate.yaml, a Feast repository,
    policies and a model declaration, each commented with what to fill in."""
    sizes = parse_sample_size(sample_size) if sample_size is not None else None
    echo_lines(write_skeleton(folder, name, sizes))


@click.group()
def project() -> None:
    """The rankgate project served: check it, or point Feast's own CLI at it."""


@project.command("check")
@click.argument(
    "folder", required=False, type=click.Path(file_okay=False, path_type=Path), default=None
)
@fails_cleanly
def project_check(folder: Path | None) -> None:
    """Validate a project (default: the selected one) without starting anything:
    rankgate.yaml, its Feast definitions, catalogue, policies and model declarations."""
    echo_lines(check_project(folder))


@project.command("env")
@fails_cleanly
def project_env() -> None:
    """Print the exports Feast's own CLI needs in the project's repository:
    `eval "$(rankgate project env)"`, then `feast apply` there works."""
    echo_lines(feast_exports())


@click.command()
@click.option(
    "--consent",
    type=click.Choice(["granted", "denied", "unknown"]),
    help="Only users in this consent state.",
)
@click.option(
    "--purpose",
    default="onsite_personalization",
    show_default=True,
    help="Purpose the consent filter reads.",
)
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many to list."
)
@fails_cleanly
def users(consent: str | None, purpose: str, limit: int) -> None:
    """List the project's demo user ids and their consent state, to know whom to ask about."""
    echo_lines(list_users(purpose, consent, limit))


@click.group("redis")
def redis_group() -> None:
    """The Redis-compatible server (REDIS_URL, or the embedded one)."""


@redis_group.command("start")
@fails_cleanly
def redis_start() -> None:
    """Start the embedded server of this home (or check REDIS_URL) and print its address."""
    click.echo(start_redis())


@redis_group.command("stop")
@fails_cleanly
def redis_stop() -> None:
    """Save and stop the embedded server of this home."""
    click.echo("stopped" if stop_redis() else "not running")


@redis_group.command("status")
@fails_cleanly
def redis_status_command() -> None:
    """Say which server this home uses and whether it answers."""
    click.echo(redis_status())
