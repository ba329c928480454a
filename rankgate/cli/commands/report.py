"""`rankgate model report`: one HTML page about a version for the people who promote it."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.options import file_option
from rankgate.cli.render import echo_lines, fails_cleanly
from rankgate.core.errors import RankgateError


@click.command("report")
@click.argument("version")
@click.option(
    "--against", default=None, help="Compare with this version (default: the logs' own policy)."
)
@file_option(
    "--out", "out", required=True, help="The HTML file to write (self-contained, readable offline)."
)
@click.option(
    "--audit",
    is_flag=True,
    help="Estimate off-policy on rankgate's audit log joined with outcomes (default: the "
    "project's log).",
)
@click.option("--since", default="7d", show_default=True, help="With --audit: how far back.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999))
@click.option(
    "--slots",
    default=None,
    type=click.IntRange(min=1),
    help="Estimate on this many logged slots drawn at random (--seed); default: all.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@fails_cleanly
def model_report(
    version: str,
    against: str | None,
    out: Path,
    audit: bool,
    since: str,
    confidence: float,
    slots: int | None,
    seed: int,
) -> None:
    """Write a self-contained HTML page about VERSION: its off-policy estimates (as `model
    evaluate`), click rate per variant and position, drift over time, lineage and
    approvals, each plot saying what it rests on. Needs `rankgate[report]` (matplotlib)."""
    # Imported here: matplotlib and the estimators load only for this command.
    from rankgate.ops.report import write_report
    from rankgate.ops.report.sections import ReportRequest

    if against == version:
        raise RankgateError(f"--against {against}: names VERSION itself; name another version")
    request = ReportRequest(version, against, audit, since, confidence, slots, seed)
    echo_lines(write_report(request, out))
