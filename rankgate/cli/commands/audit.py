"""`rankgate audit` (the decision audit log) and `rankgate privacy` (erasure from it,
and from everything else kept of a person; the demo consent nobody gave; how long
records are kept)."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from rankgate.cli.options import FOLDER_ARGUMENT
from rankgate.cli.render import echo_json, echo_lines, echo_table, fails_cleanly
from rankgate.governance.demo_consent import DEMO_SOURCE, DemoConsentTally
from rankgate.ops.access import count_demo_consent, forget, remove_demo_consent
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


@privacy.command("retention")
@FOLDER_ARGUMENT
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@fails_cleanly
def privacy_retention(folder: Path | None, as_json: bool) -> None:
    """Each kind of record's oldest against its limit in the retention of FOLDER's
    policy (default: the project's policies), read from Redis (the server may be down).
    The server removes what outlived its limit every `retention.interval_s`."""
    from rankgate.ops.retention import retention_status

    found = retention_status(folder)
    if as_json:
        echo_json([status.to_dict() for status in found])
        return
    rows = []
    for s in found:
        oldest = (
            "none"
            if s.oldest_at is None
            else datetime.fromtimestamp(s.oldest_at, UTC).isoformat(timespec="seconds")
        )
        age = "-" if s.age_days is None else days(s.age_days)
        limit = "not stated (count caps)" if s.limit_days is None else days(s.limit_days)
        state = "OVER LIMIT" if s.over_limit else ("-" if s.limit_days is None else "within")
        rows.append([s.kind, limit, oldest, age, state])
    echo_table(["kind", "limit", "oldest record", "age", ""], rows)


def days(value: float) -> str:
    """Days as people read them: whole days, hundredths below ten, seconds below a quarter hour."""
    if value >= 10 or value == int(value):
        return f"{value:.0f} d"
    if value >= 0.01:
        return f"{value:.2f} d"
    return f"{value * 86_400:.0f} s"


@privacy.group("demo-consent")
def demo_consent() -> None:
    """The made-up consent of `rankgate setup --demo-consent` (source 'rankgate-demo'):
    count it, remove it. Records of any other source are never touched."""


@demo_consent.command("list")
@fails_cleanly
def demo_consent_list() -> None:
    """Count the demo consent records: people, and records per purpose and decision."""
    started = time.perf_counter()
    tally = count_demo_consent()
    echo_tally(tally, "found", time.perf_counter() - started)


@demo_consent.command("remove")
@click.option("--yes", is_flag=True, help="Remove them (without it: say what would be removed).")
@fails_cleanly
def demo_consent_remove(yes: bool) -> None:
    """Remove every demo consent record, and no other: a person's records of other
    sources stay, and a demo record replaced by a real decision meanwhile is kept.
    Then `rankgate setup --demo-consent` writes them again."""
    started = time.perf_counter()
    if not yes:
        tally = count_demo_consent()
        echo_tally(tally, "would remove", time.perf_counter() - started)
        if tally.records:
            click.echo("error: nothing removed: add --yes to remove them", err=True)
            sys.exit(1)
        return
    tally = remove_demo_consent()
    echo_tally(tally, "removed", time.perf_counter() - started)
    if tally.left_without_record:
        click.echo(f"{tally.left_without_record} of them have no consent record left (unknown)")


def echo_tally(tally: DemoConsentTally, done: str, seconds: float) -> None:
    read = f"among {tally.people_read} people with a consent record ({seconds:.1f} s)"
    if not tally.records:
        click.echo(f"no demo consent records (source {DEMO_SOURCE!r}) {read}")
        return
    click.echo(
        f"{done} {tally.records} demo consent records of {tally.people} people (source "
        f"{DEMO_SOURCE!r}: made up, given by nobody) {read}"
    )
    echo_table(
        ["purpose", "granted", "denied"],
        [[purpose, str(g), str(d)] for purpose, g, d in tally.per_purpose()],
    )
