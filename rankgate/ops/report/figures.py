"""The report's plots: matplotlib figures written as SVG text to inline in the page.

matplotlib's object API (a `Figure` of its own, no pyplot): no global state, no GUI
back end, nothing shared between reports. Text stays text in the SVG (`svg.fonttype:
none`), so the page is small and readable offline with any font; ids are salted with
a fixed value so the same figures give the same page. Each function takes plain
figures and returns one `<svg>` element.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, cast

import matplotlib as mpl
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from serving.observe.drift_figures import DriftFigures
from serving.observe.outcomes import OutcomeTotals, wilson_interval

WIDTH = 8.0
"""Inches, at matplotlib's 72 points per inch in SVG: 576 px wide."""
MAX_POINTS = 300
"""Points a series over time is drawn with: a longer history is thinned (`thin`), so
the page stays small however long the history."""
MARKED_POINTS = 60
"""Up to this many points, each is marked; beyond, only the line is drawn."""
MOST_DRIFTED = 8
"""Inputs drawn over time (the most drifted now); every input is in the bar chart."""
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "rankgate-report",
    "font.size": 9.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def styled() -> AbstractContextManager[None]:
    """The report's look, for drawing and saving (matplotlib's own settings untouched)."""
    return cast(AbstractContextManager[None], mpl.rc_context(cast(Any, STYLE)))


def to_svg(figure: Figure) -> str:
    """The figure as an inline `<svg>` element (no XML prolog, no DOCTYPE)."""
    buffer = io.StringIO()
    with styled():
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def new_figure(height: float) -> Figure:
    with styled():
        return Figure(figsize=(WIDTH, height), layout="constrained")


def offpolicy_estimates(figures: Mapping[str, Any]) -> str:
    """Each estimator's estimate and interval for each version and the logging policy,
    with the logging policy's observed click rate as a vertical line."""
    rows: list[tuple[str, str, dict[str, float]]] = []
    for version, estimates in figures["versions"].items():
        rows += [(version, name, e) for name, e in estimates.items()]
    rows += [("logging policy", name, e) for name, e in figures["logging_policy"].items()]
    owners = list(dict.fromkeys(owner for owner, _, _ in rows))
    with styled():
        figure = new_figure(0.45 * len(rows) + 1.2)
        axes = figure.add_subplot()
        for y, (owner, name, e) in enumerate(reversed(rows)):
            colour = COLOURS[owners.index(owner) % len(COLOURS)]
            axes.errorbar(
                e["value"],
                y,
                xerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]],
                fmt="o",
                color=colour,
                capsize=4,
            )
        axes.set_yticks(
            range(len(rows)), [f"{owner} · {name}" for owner, name, _ in reversed(rows)]
        )
        axes.axvline(
            figures["logged_click_rate"],
            color="grey",
            linestyle="--",
            label=f"observed click rate {figures['logged_click_rate']:.4f}",
        )
        axes.set_xlabel(f"estimated click rate ({figures['confidence']:.0%} interval)")
        axes.legend(loc="lower right")
    return to_svg(figure)


def offpolicy_differences(figures: Mapping[str, Any], version: str) -> str:
    """The difference (version - against) per estimator with its interval, and zero."""
    comparisons = figures["comparisons"]
    with styled():
        figure = new_figure(0.45 * len(comparisons) + 1.2)
        axes = figure.add_subplot()
        for y, (name, c) in enumerate(comparisons.items()):
            colour = {"better": "#2ca02c", "worse": "#d62728"}.get(c["verdict"], "#555555")
            axes.errorbar(
                c["difference"],
                y,
                xerr=[[c["difference"] - c["low"]], [c["high"] - c["difference"]]],
                fmt="s",
                color=colour,
                capsize=4,
            )
            axes.annotate(
                c["verdict"], (c["high"], y), xytext=(6, 0), textcoords="offset points", va="center"
            )
        axes.set_yticks(range(len(comparisons)), list(comparisons))
        axes.axvline(0.0, color="grey", linestyle="--")
        axes.set_xlabel(f"{version} − {figures['against']} (click rate)")
    return to_svg(figure)


def _label(totals: OutcomeTotals) -> str:
    return f"{totals.version} · {totals.variant}"


def ctr_by_variant(totals: Sequence[OutcomeTotals], confidence: float) -> str:
    """Click rate of each version and variant with its Wilson interval."""
    with styled():
        figure = new_figure(0.45 * len(totals) + 1.2)
        axes = figure.add_subplot()
        for y, t in enumerate(totals):
            interval = t.ctr_interval(confidence) or (0.0, 0.0)
            axes.errorbar(
                t.exposure.ctr,
                y,
                xerr=[[t.exposure.ctr - interval[0]], [interval[1] - t.exposure.ctr]],
                fmt="o",
                color=COLOURS[y % len(COLOURS)],
                capsize=4,
            )
            axes.annotate(
                f"{t.clicks} / {t.impressions}",
                (interval[1], y),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
            )
        axes.set_yticks(range(len(totals)), [_label(t) for t in totals])
        axes.set_xlabel(f"click rate (clicks / impressions, {confidence:.0%} Wilson interval)")
    return to_svg(figure)


def ctr_by_position(totals: Sequence[OutcomeTotals], confidence: float) -> str:
    """Click rate at each position of each version and variant, with Wilson intervals
    (series side by side at each position)."""
    with styled():
        figure = new_figure(3.2)
        axes = figure.add_subplot()
        shift = 0.6 / max(len(totals), 1)
        for n, t in enumerate(totals):
            xs, ys, lows, highs = [], [], [], []
            for position, counters in t.by_position.items():
                shown, clicked = counters.get("impressions", 0), counters.get("clicks", 0)
                interval = wilson_interval(clicked, shown, confidence)
                if interval is None:
                    continue
                rate = min(clicked, shown) / shown
                xs.append(position + (n - (len(totals) - 1) / 2) * shift)
                ys.append(rate)
                lows.append(rate - interval[0])
                highs.append(interval[1] - rate)
            axes.errorbar(
                xs,
                ys,
                yerr=[lows, highs],
                fmt="o",
                color=COLOURS[n % len(COLOURS)],
                capsize=3,
                label=_label(t),
            )
        axes.set_xlabel("position in the answer")
        axes.set_ylabel("click rate")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
    return to_svg(figure)


def thinning(entries: int) -> int:
    """How many history entries make one drawn point."""
    return max(1, -(-entries // MAX_POINTS))


def thin(history: Sequence[DriftFigures]) -> list[DriftFigures]:
    """At most MAX_POINTS points: each the largest PSI (per input, and of the scores) of
    `thinning` consecutive entries, at the last one's time, so a peak is never smoothed
    away."""
    step = thinning(len(history))
    if step == 1:
        return list(history)
    points = []
    for start in range(0, len(history), step):
        chunk = history[start : start + step]
        scores = [f.score_psi for f in chunk if f.score_psi is not None]
        names = dict.fromkeys(name for f in chunk for name in f.feature_psi)
        points.append(
            DriftFigures(
                version=chunk[-1].version,
                at=chunk[-1].at,
                window_s=chunk[-1].window_s,
                rows=chunk[-1].rows,
                has_reference=chunk[-1].has_reference,
                feature_psi={
                    name: max(f.feature_psi[name] for f in chunk if name in f.feature_psi)
                    for name in names
                },
                score_psi=max(scores) if scores else None,
                thresholds=chunk[-1].thresholds,
            )
        )
    return points


def marker(points: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if points <= MARKED_POINTS else {}


def time_axis(axes: Any, history: Sequence[DriftFigures]) -> None:
    """UTC dates on the x axis, spanning the entries with half a window either side (a
    single entry would otherwise sit in an axis years wide)."""
    times = _times(history)
    pad = max((times[-1] - times[0]) * 0.05, history[-1].window_s / 86400 / 2)
    axes.set_xlim(times[0] - pad, times[-1] + pad)
    locator = AutoDateLocator(tz=UTC)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))


def _times(history: Sequence[DriftFigures]) -> list[float]:
    """Entry times as matplotlib dates (the axis shows them as UTC times)."""
    return [float(date2num(datetime.fromtimestamp(f.at, UTC))) for f in history]


def score_psi_over_time(history: Mapping[str, Sequence[DriftFigures]]) -> str:
    """The PSI of each version's scores at each history entry, and the flag threshold."""
    with styled():
        figure = new_figure(3.0)
        axes = figure.add_subplot()
        threshold = None
        everything: list[DriftFigures] = []
        for n, (version, entries) in enumerate(history.items()):
            points = thin([f for f in entries if f.score_psi is not None])
            if points:
                axes.plot(
                    _times(points),
                    [float(f.score_psi or 0.0) for f in points],
                    color=COLOURS[n % len(COLOURS)],
                    label=version,
                    **marker(len(points)),
                )
                threshold = points[-1].thresholds.get("score_psi", threshold)
                everything += points
        if threshold is not None:
            axes.axhline(threshold, color="grey", linestyle="--", label=f"flag at {threshold:g}")
        time_axis(axes, sorted(everything, key=lambda f: f.at))
        axes.set_ylabel("score PSI")
        axes.set_xlabel("time (UTC)")
        axes.legend()
    return to_svg(figure)


def feature_psi_over_time(version: str, history: Sequence[DriftFigures]) -> str:
    """The PSI of the version's most drifted inputs (as of its last entry) over time."""
    latest = history[-1]
    points = thin([f for f in history if f.feature_psi])
    inputs = [name for name, _ in latest.top_features(MOST_DRIFTED)]
    with styled():
        figure = new_figure(3.4)
        axes = figure.add_subplot()
        for n, name in enumerate(inputs):
            series = [
                (t, f.feature_psi[name])
                for t, f in zip(_times(points), points, strict=True)
                if name in f.feature_psi
            ]
            axes.plot(
                [t for t, _ in series],
                [v for _, v in series],
                color=COLOURS[n % len(COLOURS)],
                label=name,
                **marker(len(series)),
            )
        threshold = latest.thresholds.get("feature_psi")
        if threshold is not None:
            axes.axhline(threshold, color="grey", linestyle="--", label=f"flag at {threshold:g}")
        time_axis(axes, points)
        axes.set_ylabel("input PSI")
        axes.set_xlabel("time (UTC)")
        axes.legend(fontsize=7, ncols=2)
    return to_svg(figure)


def feature_psi_now(figures: DriftFigures) -> str:
    """The PSI of every input in one window, largest first, and the flag threshold."""
    ranked = figures.top_features(len(figures.feature_psi))
    threshold = figures.thresholds.get("feature_psi")
    with styled():
        figure = new_figure(0.22 * len(ranked) + 1.0)
        axes = figure.add_subplot()
        colours = [
            "#d62728" if threshold is not None and v > threshold else "#1f77b4" for _, v in ranked
        ]
        axes.barh(range(len(ranked)), [v for _, v in ranked], color=colours)
        axes.set_yticks(range(len(ranked)), [name for name, _ in ranked], fontsize=7)
        axes.invert_yaxis()
        if threshold is not None:
            axes.axvline(threshold, color="grey", linestyle="--", label=f"flag at {threshold:g}")
            axes.legend(loc="lower right")
        axes.set_xlabel("PSI against the training reference")
    return to_svg(figure)
