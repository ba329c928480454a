"""`rankgate model report`: one self-contained HTML page about a version, for the people
who decide its promotion.

`sections` gathers what the page shows from what rankgate already keeps, never
recomputing it: the off-policy evaluation of `rankgate model evaluate`, the outcome
counters the event consumer keeps, the drift history replicas write, and the
manifest's lineage and approvals. `figures` draws them with matplotlib as inline SVG
and `page` puts the page together. Only the report command imports this package, so
matplotlib never loads on a serving replica or in another command.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from rankgate.core.errors import RankgateError
from rankgate.ops.report.sections import ReportData, ReportRequest

REPORT_EXTRA = "pip install 'rankgate[report]'"


def require_matplotlib() -> None:
    """matplotlib is an extra (`rankgate[report]`), not a dependency of the server."""
    if importlib.util.find_spec("matplotlib") is None:
        raise RankgateError(
            f"`rankgate model report` draws with matplotlib, which is not installed: {REPORT_EXTRA}"
        )


def write_report(request: ReportRequest, out: Path) -> list[str]:
    """Gather, draw and write the page to `out`; lines saying what it rests on."""
    require_matplotlib()
    from rankgate.ops.report.page import render
    from rankgate.ops.report.sections import gather

    started = time.perf_counter()
    data = gather(request)
    page = render(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return [
        *summary(data),
        f"wrote {out} ({len(page) / 1024:.0f} KiB) in {time.perf_counter() - started:.1f} s",
    ]


def summary(data: ReportData) -> list[str]:
    offpolicy = data.offpolicy.report
    return [
        "off-policy: "
        + (
            f"{offpolicy.result.n} logged slots, {offpolicy.result.clicks} clicks ({offpolicy.source})"
            if offpolicy is not None
            else f"none ({data.offpolicy.missing})"
        ),
        f"click rate online: {data.outcomes.impressions} impressions, {data.outcomes.clicks} clicks",
        f"drift: {data.drift.points} history entries",
    ]
