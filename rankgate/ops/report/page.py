"""The report as one HTML page: inline CSS, inline SVG, no script, no external file.

Each section opens with where its figures come from and how many records they rest on,
and says plainly when it has none (no empty plots). Manifest sections are rendered
generically (every field, nested ones as dotted names), so what the manifest gains
later is shown without a change here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from rankgate.core import redis_keys
from rankgate.ops.report import figures as plot
from rankgate.ops.report.sections import (
    DriftSection,
    OffPolicySection,
    OutcomeSection,
    Provenance,
    ReportData,
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222;
       padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.source { color: #555; font-size: 0.92em; }
.empty { background: #f6f6f6; border-left: 4px solid #bbb; padding: 0.5em 1em; }
figure { margin: 1em 0; } figcaption { color: #444; font-size: 0.9em; }
figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f8f8f8; padding: 0.6em; white-space: pre-wrap; font-size: 0.85em; }
"""


def render(data: ReportData) -> str:
    """The whole page."""
    request = data.request
    title = f"Promotion report: {request.version}"
    against = request.against or "the logging policy"
    generated = shown(data.generated_at)
    body = [
        f"<h1>{escape(title)}</h1>",
        (
            f'<p class="source">Project {escape(data.project)}, against {escape(against)}; '
            f"generated {generated} by <code>{escape(command_line(data))}</code>. "
            "Every figure below is read from what rankgate keeps; none is recomputed here.</p>"
        ),
        *offpolicy(data.offpolicy, request.version),
        *outcomes(data.outcomes, data.versions, data.namespace),
        *drift(data.drift, data.namespace),
        *lineage(data.provenance),
        *approvals(data.provenance),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def command_line(data: ReportData) -> str:
    request, words = data.request, ["rankgate model report", data.request.version]
    if request.against:
        words += ["--against", request.against]
    if request.audit:
        words += ["--audit", "--since", request.since]
    if request.slots is not None:
        words += ["--slots", str(request.slots), "--seed", str(request.seed)]
    if request.confidence != 0.95:
        words += ["--confidence", f"{request.confidence:g}"]
    return " ".join(words)


def shown(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def source(text: str) -> str:
    return f'<p class="source">{text}</p>'


def empty(text: str) -> str:
    return f'<p class="empty">{escape(text)}</p>'


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    cells = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{cells}</table>"


# -- sections -------------------------------------------------------------------


def offpolicy(section: OffPolicySection, version: str) -> list[str]:
    html = ["<h2>Off-policy evidence</h2>"]
    if section.report is None:
        return html + [empty(f"No off-policy estimate: {section.missing}")]
    report = section.report
    figures = report.figures()
    html.append(
        source(
            f"From <code>rankgate model evaluate</code> on {escape(report.source)}: "
            f"<b>{figures['slots']} logged slots with {figures['clicks']} clicks</b>. "
            f"IPS, self-normalized IPS and doubly robust estimates of the click rate each "
            f"version would have had on the same slots, with {report.confidence:.0%} "
            f"{escape(figures['interval_method'])} intervals (valid however few the clicks)."
        )
    )
    html.append(
        figure(
            plot.offpolicy_estimates(figures),
            "Each row is one estimator's estimate (dot) and interval (bar). The logging "
            "policy's rows apply the estimators to the policy that made the logged "
            "decisions: the dashed line, its observed click rate, should fall inside them.",
        )
    )
    html.append(
        figure(
            plot.offpolicy_differences(figures, version),
            f"{escape(version)} minus {escape(report.against)} per estimator: a verdict of "
            "better or worse needs the whole interval on one side of zero.",
        )
    )
    html.append("<pre>" + escape("\n".join(report.lines())) + "</pre>")
    return html


def outcomes(section: OutcomeSection, versions: Sequence[str], namespace: str) -> list[str]:
    html = ["<h2>Click rate online</h2>"]
    key = escape(redis_keys.outcomes(namespace, "<version>", "<variant>"))
    with_counts = [t for t in section.totals if t.impressions]
    if not with_counts:
        return html + [
            empty(
                f"No impressions joined to answers of {', '.join(versions)} yet: the "
                "application's impression and click events (rankgate.yaml events.outcomes) "
                "are counted once the versions serve traffic."
            )
        ]
    html.append(
        source(
            f"From the outcome counters the event consumer keeps per version and variant "
            f"(Redis <code>{key}</code>): <b>{section.impressions} impressions, "
            f"{section.clicks} clicks</b> in {len(with_counts)} counter(s), since each "
            "counter started (a canary's counts from its promotion)."
        )
    )
    html.append(
        figure(
            plot.ctr_by_variant(with_counts, section.confidence),
            f"Click rate of each version and variant with its {section.confidence:.0%} "
            "Wilson interval; clicks / impressions beside it.",
        )
    )
    if any(t.by_position for t in with_counts):
        html.append(
            figure(
                plot.ctr_by_position(with_counts, section.confidence),
                "Click rate at each position of the answer: a version that ranks better "
                "moves clicks toward the top.",
            )
        )
    html.append(
        table(
            ["version", "variant", "decisions", "impressions", "clicks", "conversions"],
            [
                (t.version, t.variant, t.decisions, t.impressions, t.clicks, t.conversions)
                for t in with_counts
            ],
        )
    )
    return html


def drift(section: DriftSection, namespace: str) -> list[str]:
    html = ["<h2>Drift against the training reference</h2>"]
    key = escape(redis_keys.drift_history(namespace, "<version>"))
    html.append(
        source(
            f"From the drift history replicas write (Redis <code>{key}</code>, one entry "
            f"per replica per window bucket): <b>{section.points} entries</b>; each is the "
            "PSI of the scores and of every input over the sliding window then."
        )
    )
    with_scores = {
        v: h for v, h in section.history.items() if any(f.score_psi is not None for f in h)
    }
    if with_scores:
        html.append(
            figure(
                plot.score_psi_over_time(with_scores),
                "PSI of the scores over time: how far the live score distribution is from "
                "the one on the training data (0.1 a moderate shift, 0.25 a large one)"
                + thinned(max(len(h) for h in with_scores.values()))
                + ".",
            )
        )
    for version, history in section.history.items():
        html.append(f"<h3>{escape(version)}</h3>")
        latest = section.latest.get(version)
        if latest is not None:
            html.append(source(f"Now: {escape(latest.describe())}."))
        if not history:
            html.append(
                empty(
                    f"No drift history for {version}: no replica has scored with it "
                    "(as stable, canary, shadow or alternate) since the history began."
                )
            )
            continue
        if not any(f.has_reference for f in history):
            html.append(
                empty(
                    f"{version} has no drift reference ({history[-1].rows} rows scored in "
                    f"the last window): nothing is compared. `rankgate model reference "
                    f"{version}` adds one."
                )
            )
            continue
        points = [f for f in history if f.feature_psi]
        if not points:
            html.append(empty(f"{len(history)} entries, none with rows scored in its window."))
            continue
        html.append(
            figure(
                plot.feature_psi_over_time(version, points),
                f"PSI of {escape(version)}'s most drifted inputs over time ({len(points)} "
                f"entries from {shown(points[0].at)} to {shown(points[-1].at)}"
                + thinned(len(points))
                + ").",
            )
        )
        html.append(
            figure(
                plot.feature_psi_now(points[-1]),
                f"PSI of every input in the last entry's window ({points[-1].rows} rows "
                f"scored); red bars are above the flag threshold.",
            )
        )
    return html


def thinned(entries: int) -> str:
    step = plot.thinning(entries)
    return f"; each point is the largest PSI of {step} consecutive entries" if step > 1 else ""


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A JSON value as (dotted name, text) rows; lists of plain values joined."""
    if isinstance(value, Mapping):
        rows = []
        for name, inner in value.items():
            rows += flatten(inner, f"{prefix}.{name}" if prefix else str(name))
        return rows or [(prefix, "(empty)")]
    if isinstance(value, list):
        if all(not isinstance(v, Mapping | list) for v in value):
            return [(prefix, ", ".join(str(v) for v in value) or "(none)")]
        return [(prefix, json.dumps(value, sort_keys=True))]
    return [(prefix, "-" if value is None else str(value))]


def cell(value: Any) -> str:
    """One table cell of a JSON value: nested ones (an approval's evidence) as name: value."""
    if isinstance(value, Mapping | list):
        return "; ".join(f"{name}: {text}" if name else text for name, text in flatten(value))
    return "-" if value is None else str(value)


def lineage(provenance: Mapping[str, Provenance]) -> list[str]:
    html = ["<h2>Lineage</h2>"]
    for version, p in provenance.items():
        html.append(f"<h3>{escape(version)}</h3>")
        html.append(
            source(
                f"From the manifest <code>{escape(p.manifest_path)}</code> (created {p.created_at})."
            )
        )
        if not p.lineage:
            html.append(empty(f"No lineage recorded for {version}."))
        else:
            html.append(table(["field", "value"], flatten(p.lineage)))
        for name, part in (("training data", p.training_data), ("held-out metrics", p.metrics)):
            if part:
                html.append(
                    f"<p>{name.capitalize()}:</p>" + table(["field", "value"], flatten(part))
                )
    return html


def approvals(provenance: Mapping[str, Provenance]) -> list[str]:
    html = ["<h2>Approvals</h2>"]
    for version, p in provenance.items():
        html.append(f"<h3>{escape(version)}</h3>")
        if not p.approvals:
            html.append(empty(f"No approvals recorded for {version}."))
            continue
        html.append(
            source(
                f"{len(p.approvals)} approval(s) in the version's <code>approvals.jsonl</code> "
                "(<code>rankgate model approve</code>), oldest first."
            )
        )
        columns = list(dict.fromkeys(name for a in p.approvals for name in a))
        html.append(
            table(
                columns,
                [[cell(a.get(c)) for c in columns] for a in p.approvals],
            )
        )
    return html
