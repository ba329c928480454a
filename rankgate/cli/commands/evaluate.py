"""`rankgate model evaluate`: a version's click rate, estimated off-policy."""

from __future__ import annotations

from typing import Any

import click

from rankgate.cli.options import file_option
from rankgate.cli.render import echo_json, echo_lines, fails_cleanly
from rankgate.ops.evaluation import EvaluationRequest, evaluate


@click.command("evaluate")
@click.argument("version")
@click.option(
    "--against", default=None, help="Compare with this version (default: the logs' own policy)."
)
@file_option(
    "--logs",
    "logs_path",
    exists=True,
    help="A log file with the columns rankgate.yaml `interactions` declares (default: the project's log).",
)
@click.option(
    "--audit", is_flag=True, help="Evaluate on rankgate's audit log joined with outcomes."
)
@click.option("--since", default="7d", show_default=True, help="With --audit: how far back.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--slots",
    default=None,
    type=click.IntRange(min=1),
    help="Evaluate on this many logged slots drawn at random (--seed); default: all.",
)
@click.option(
    "--holdout-after",
    default=None,
    metavar="TIME",
    help="Evaluate only on slots decided after this ISO 8601 time (UTC without an offset), "
    "e.g. the end of the versions' training windows.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@fails_cleanly
def model_evaluate(as_json: bool, **request: Any) -> None:
    """Estimate VERSION's click rate off-policy from logged decisions with propensities:
    IPS, self-normalized IPS and doubly robust (VERSION's scores as the reward model),
    each with a betting confidence interval and the effective sample size, and a verdict against
    --against (or the logging policy's observed click rate)."""
    # The other parameters are the request's fields, by name.
    report = evaluate(EvaluationRequest(**request))
    if as_json:
        echo_json(report.figures())
    else:
        echo_lines(report.lines())
