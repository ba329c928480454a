"""What a version learned from, checked against what it is evaluated on.

A version's training window (manifest `lineage.trained_on`) is the time range of the
rows it learned from: declared when it is registered (`model register --trained-on
FROM..TO`), recorded by `model train` (its training rows, the held-out tail
excluded). An off-policy evaluation on slots from inside that range is in-sample: the
version has seen those clicks and its estimate is optimistic. `InSample` says, for
every version evaluated, whether its window overlaps the evaluated slots' times, or
that it cannot tell (no window, or slots without times).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from model_store.manifest import Manifest, TrainingWindow, shown_time
from rankgate.core.errors import ModelStoreError

if TYPE_CHECKING:
    import numpy as np

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_FORMS = (
    "an ISO 8601 time, e.g. 2026-11-30 or 2026-11-30T12:00:00+01:00 (UTC without an offset)"
)


def parse_instant(text: str, option: str, value: str | None = None) -> datetime:
    """An ISO 8601 time given to `option` (UTC when it has no offset); ModelStoreError
    (422) names the option (and its whole `value`, when `text` is a part of it)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        part = f" {text!r} is" if value is not None else ""
        raise ModelStoreError(f"{option} {value or text!r}:{part} not {TIME_FORMS}", 422) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_window(text: str) -> TrainingWindow:
    """`FROM..TO` of `--trained-on`: two ISO 8601 times, FROM before TO."""
    start, sep, end = text.partition("..")
    if not sep or not start.strip() or not end.strip():
        raise ModelStoreError(f"--trained-on {text!r}: give FROM..TO, each {TIME_FORMS}", 422)
    first = parse_instant(start, "--trained-on", text)
    last = parse_instant(end, "--trained-on", text)
    if not first < last:
        raise ModelStoreError(
            f"--trained-on {text!r}: FROM ({shown_time(first)}) must be before TO "
            f"({shown_time(last)})",
            422,
        )
    return TrainingWindow(start=first, end=last)


def to_nanoseconds(moment: datetime) -> int:
    """A time as int64 nanoseconds since the epoch (the log's times)."""
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def from_nanoseconds(ns: int, up: bool = False) -> datetime:
    """A log time (int64 ns) as a datetime, to the microsecond below (`up`: above)."""
    return EPOCH + timedelta(microseconds=-(-int(ns) // 1000) if up else int(ns) // 1000)


@dataclass(frozen=True)
class InSample:
    """Which of the evaluated versions may have learned from the evaluated slots."""

    span: tuple[int, int] | None
    """The first and last evaluated slot's time, int64 ns (None: the slots have no times)."""
    overlapping: dict[str, TrainingWindow | None] = field(default_factory=dict)
    """Versions whose training window overlaps the slots (None: trained by rankgate on
    this very log before windows were recorded)."""
    unknown: list[str] = field(default_factory=list)
    """Versions it cannot tell for: no training window, or slots without times."""

    def lines(self, advice: bool = True) -> list[str]:
        """One line per version it warns for (`advice`: and how to evaluate out of sample
        with `model evaluate`)."""
        lines = []
        for version, window in self.overlapping.items():
            if window is None:
                lines.append(
                    f"  {version} learned from these logs (rankgate model train, no training "
                    "window recorded): on them its estimate is optimistic"
                )
            else:
                lines.append(
                    f"  {version}'s training window {window} overlaps these slots "
                    f"({'..'.join(self.shown_span)}): if it learned from them, its estimate "
                    "on them is optimistic"
                )
        if self.overlapping and advice:
            ends = [w.end for w in self.overlapping.values() if w is not None]
            later = f"--holdout-after {shown_time(max(ends))}, " if ends else ""
            lines.append(f"  evaluate on slots it has not seen: {later}--logs FILE or --audit")
        for version in self.unknown:
            lines.append(
                f"  {version} has no training window (register --trained-on FROM..TO): "
                "cannot check it did not learn from these slots"
                if self.span is not None
                else f"  these slots have no times: cannot check {version} did not learn from them"
            )
        return lines

    @property
    def shown_span(self) -> list[str]:
        """The first and last slot's time, as printed (empty: unknown)."""
        if self.span is None:
            return []
        first, last = self.span
        return [shown_time(from_nanoseconds(first)), shown_time(from_nanoseconds(last, up=True))]

    def figures(self) -> dict[str, Any]:
        return {
            "slot_times": self.shown_span or None,
            "overlapping": {
                version: "this log (no training window recorded)" if window is None else str(window)
                for version, window in self.overlapping.items()
            },
            "unknown": self.unknown,
        }


def in_sample(
    manifests: Mapping[str, Manifest],
    span: tuple[int, int] | None,
    project_log: bool,
) -> InSample:
    """Check each version's training window against the slots' `span`; `project_log`:
    the slots are the project's own interaction log (what `model train` learns from)."""
    overlapping: dict[str, TrainingWindow | None] = {}
    unknown = []
    for version, manifest in manifests.items():
        window = manifest.lineage.trained_on
        if window is None and project_log and manifest.lineage.made_by == "rankgate model train":
            overlapping[version] = None
        elif window is None or span is None:
            unknown.append(version)
        elif to_nanoseconds(window.start) <= span[1] and span[0] <= to_nanoseconds(window.end):
            overlapping[version] = window
    return InSample(span, overlapping, unknown)


def time_span(times_ns: np.ndarray | None) -> tuple[int, int] | None:
    """The first and last of the slots' times (int64 ns; None or empty: unknown)."""
    if times_ns is None or len(times_ns) == 0:
        return None
    return int(times_ns.min()), int(times_ns.max())
