"""`rankgate model evaluate`: a version's click rate, estimated off-policy."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.render import echo_json, echo_lines, fails_cleanly
from rankgate.ops.evaluation import evaluate


@click.command("evaluate")
@click.argument("version")
@click.option(
    "--against", default=None, help="Compare with this version (default: the logs' own policy)."
)
@click.option(
    "--logs",
    "logs_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A log file with the columns rankgate.yaml `interactions` declares (default: the project's log).",
)
@click.option(
    "--audit", is_flag=True, help="Evaluate on rankgate's audit log joined with outcomes."
)
@click.option("--since", default="7d", show_default=True, help="With --audit: how far back.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999))
@click.option("--draws", default=1000, show_default=True, type=click.IntRange(100, 20_000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@fails_cleanly
def model_evaluate(
    version: str,
    against: str | None,
    logs_path: Path | None,
    audit: bool,
    since: str,
    confidence: float,
    draws: int,
    seed: int,
    as_json: bool,
) -> None:
    """Estimate VERSION's click rate off-policy from logged decisions with propensities:
    IPS, self-normalized IPS and doubly robust (VERSION's scores as the reward model),
    each with a bootstrap interval and the effective sample size, and a verdict against
    --against (or the logging policy's observed click rate)."""
    report = evaluate(version, against, logs_path, audit, since, confidence, draws, seed)
    if as_json:
        echo_json(report.figures())
    else:
        echo_lines(report.lines())
