"""`rankgate events`: the event stream and the streaming features it feeds."""

from __future__ import annotations

import click

from rankgate.cli.render import fails_cleanly, say
from rankgate.ops.replays import replay_events


@click.group()
def events() -> None:
    """The event stream (POST /v1/events) and the streaming features it feeds."""


@events.command("replay")
@click.option(
    "--since",
    required=True,
    help="From when: a duration back from now (30m, 2h, 7d), an ISO 8601 time, "
    "a stream id, or 0 for every event the stream keeps.",
)
@fails_cleanly
def events_replay(since: str) -> None:
    """Rebuild the streaming features from the events since --since."""
    report = replay_events(since, say)
    click.echo(
        f"replayed {report.events} events: {report.applied} applied to streaming features; "
        f"{report.people_reset} people's counts rebuilt, {report.rows_defaulted} reset to defaults"
    )
