"""What a version learned from: checked against what it is evaluated on, and recorded
for residency.

A version's data lineage (manifest `lineage.data`) names the regions of the people
in its training data (read by `model train` from the project's `data_regions`
column, or declared with `model register --data-regions`), its rows and a sha256
of its input tables (`table_digests`, streamed file by file). Residency rules in
policy.yaml read the regions (rankgate/governance/residency.py).

A version's training window (manifest `lineage.trained_on`) is the time range of the
rows it learned from: declared when it is registered (`model register --trained-on
FROM..TO`), recorded by `model train` (its training rows, the held-out tail
excluded). An off-policy evaluation on slots from inside that range is in-sample: the
version has seen those clicks and its estimate is optimistic. `InSample` says, for
every version evaluated, whether its window overlaps the evaluated slots' times, or
that it cannot tell (no window, or slots without times).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from model_store.manifest import MANIFEST_FILE, DataLineage, Manifest, TrainingWindow, shown_time
from model_store.store import ModelStore, write_json
from rankgate.core.errors import ModelStoreError
from rankgate.core.project import Project

if TYPE_CHECKING:
    from features.applied import AppliedView
    from features.spec import FeatureSpec
    from model_store.logged import LoggedRows

REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
"""A data region's code: EU, US, us-east-1."""

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


def parse_regions(text: str, option: str) -> list[str]:
    """`EU,US` of `option`: region codes (letters, digits, _ and -), sorted, each once;
    ModelStoreError (422) names the option and the bad code."""
    regions = [part.strip() for part in text.split(",")]
    for region in regions:
        if not REGION.fullmatch(region):
            raise ModelStoreError(
                f"{option} {text!r}: {region!r} is not a region code (letters, digits, _ and -, "
                "e.g. EU,US)",
                422,
            )
    return sorted(set(regions))


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (a table of 10^7 rows is never held whole); of a
    folder (a partitioned table), over its files' relative names and digests."""
    if path.is_dir():
        digest = hashlib.sha256()
        for part in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{part.relative_to(path)}\0{file_digest(part)}\n".encode())
        return digest.hexdigest()
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError as exc:
        raise ModelStoreError(f"{path}: input table not found", 422) from exc


def table_digests(tables: Mapping[str, Path]) -> tuple[dict[str, str], str]:
    """Each input table's sha256, by name, and one sha256 over the names and digests."""
    digests = {name: file_digest(path) for name, path in sorted(tables.items())}
    combined = hashlib.sha256(
        "".join(f"{name}\0{value}\n" for name, value in digests.items()).encode()
    ).hexdigest()
    return digests, combined


def input_tables(
    project: Project,
    views: Sequence[AppliedView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
    log_path: Path,
) -> dict[str, Path]:
    """The files a trained version's rows are built from, by role: the interaction log,
    the offline source of each view its inputs read (streaming views are computed from
    the log) and of the item view, and the people table of `data_regions`."""
    from features.tables import source_path

    by_name = {v.name: v for v in views}
    tables = {"interactions": log_path}
    read = {s.view for s in specs if s.view} - set(project.streaming)
    if project.spec.item_view and any(s.source == "item" for s in specs):
        read.add(project.spec.item_view)
    for name in sorted(read):
        view = by_name.get(name)
        if view is not None and view.source_path is not None:
            tables[f"view {name}"] = source_path(view, project)
    regions = project.spec.data_regions
    if regions is not None and regions.path is not None:
        tables["data_regions"] = project.path(regions.path, data_dir)
    return tables


def region_counts(
    project: Project, data_dir: Path, logs: pd.DataFrame, user_column: str
) -> tuple[dict[str, int], int]:
    """Rows per data region of the log's people, and the rows of people of no known
    region, by the project's `data_regions` (vectorized: one index lookup per row)."""
    from features.tables import read_table

    declared = project.spec.data_regions
    assert declared is not None
    where = f"{project.file}: field 'data_regions"
    if declared.path is None:
        if declared.column not in logs:
            raise ModelStoreError(
                f"{where}.column': the interaction log has no column {declared.column!r}", 422
            )
        values = logs[declared.column].to_numpy()
        codes, names = pd.factorize(values, use_na_sentinel=True)
    else:
        key = project.spec.user.join_key
        path = project.path(declared.path, data_dir)
        people = read_table(path)
        for column in (key, declared.column):
            if column not in people:
                raise ModelStoreError(f"{where}.path': {path} has no column {column!r}", 422)
        people = people[[key, declared.column]].drop_duplicates(key, keep="last")
        person_codes, names = pd.factorize(people[declared.column], use_na_sentinel=True)
        at = pd.Index(people[key]).get_indexer(pd.Index(logs[user_column].to_numpy()))
        codes = np.where(at >= 0, person_codes[np.maximum(at, 0)], -1)
    counts = np.bincount(np.asarray(codes, dtype=np.int64) + 1, minlength=len(names) + 1)
    by_region = {str(names[n]): int(counts[n + 1]) for n in range(len(names)) if counts[n + 1]}
    for region in by_region:
        if not REGION.fullmatch(region):
            raise ModelStoreError(
                f"{where}.column': {region!r} is not a region code (letters, digits, _ and -)",
                422,
            )
    return by_region, int(counts[0])


def trained_lineage(
    project: Project,
    views: Sequence[AppliedView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
    logged: LoggedRows,
) -> DataLineage:
    """The data lineage `model train` records: the regions of the people in the log's
    rows (all of them: the held-out rows build the version's drift reference and item
    embeddings too), the rows, the input tables' digests."""
    interactions = project.spec.interactions
    assert interactions is not None  # LoggedRows.read refuses a project without a log
    log_path = project.path(interactions.path, data_dir)
    logs, user_column = logged.logs, logged.user_column
    tables, digest = table_digests(input_tables(project, views, data_dir, specs, log_path))
    declared = project.spec.data_regions
    by_region, unknown = (
        region_counts(project, data_dir, logs, user_column)
        if declared is not None
        else ({}, len(logs))
    )
    cleared = [r for r in declared.cleared_for_transfer if r in by_region] if declared else []
    return DataLineage(
        regions=sorted(by_region),
        source="region column",
        rows_by_region=by_region,
        rows_without_region=unknown,
        cleared_for_transfer=sorted(cleared),
        rows=len(logs),
        tables=tables,
        digest=digest,
    )


def declared_lineage(
    regions: str | None,
    cleared: str | None,
    rows: int | None,
    data_files: Sequence[Path],
) -> DataLineage | None:
    """The data lineage `model register` records from its options (None: none declared)."""
    if regions is None:
        for given, option in ((cleared, "--cleared-for-transfer"), (rows, "--training-rows")):
            if given is not None:
                raise ModelStoreError(f"{option}: give --data-regions too", 422)
        if data_files:
            raise ModelStoreError("--data-file: give --data-regions too", 422)
        return None
    named = parse_regions(regions, "--data-regions")
    cleared_regions = parse_regions(cleared, "--cleared-for-transfer") if cleared else []
    stray = [r for r in cleared_regions if r not in named]
    if stray:
        raise ModelStoreError(
            f"--cleared-for-transfer: {stray[0]!r} is not one of --data-regions {regions!r}", 422
        )
    if rows is not None and rows < 1:
        raise ModelStoreError(f"--training-rows: {rows} is not a positive number of rows", 422)
    tables, digest = (
        table_digests({path.name: path for path in data_files}) if data_files else ({}, None)
    )
    return DataLineage(
        regions=named,
        source="declared",
        cleared_for_transfer=cleared_regions,
        rows=rows,
        tables=tables,
        digest=digest,
    )


def record_lineage(
    store: ModelStore,
    project: Project,
    views: Sequence[AppliedView],
    data_dir: Path,
    version: str,
) -> DataLineage:
    """Give a version `model train` made before lineage existed its data lineage, read
    from the project's interaction log, once that log is shown to be the one it was
    trained on: its rows, rebuilt with the version's inputs, have the training matrix's
    recorded fingerprint. Nothing the version scores with changes."""
    from model_store.logged import LoggedRows, logged_training_set

    manifest = store.manifest(version)
    if manifest.lineage.data is not None:
        raise ModelStoreError(f"model version {version!r} already has its lineage", 409)
    if manifest.lineage.made_by != "rankgate model train" or manifest.training_data is None:
        raise ModelStoreError(
            f"model version {version!r} was registered, not trained here: its lineage is what "
            "its registration declared (register it again with --data-regions)",
            422,
        )
    report = store.check_hashes(version)
    if not report.ok:
        raise ModelStoreError(f"model version {version!r}: " + "; ".join(report.failures()))
    specs = manifest.specs
    logged = LoggedRows.read(project, views, data_dir, specs)
    if logged_training_set(logged, specs).fingerprint != manifest.training_data.fingerprint:
        raise ModelStoreError(
            f"model version {version!r}: the interaction log's rows are not the ones it was "
            "trained on (their fingerprint differs from its training matrix's), so they cannot "
            "say where its data came from",
            409,
        )
    data = trained_lineage(project, views, data_dir, specs, logged)
    updated = manifest.model_copy(
        update={"lineage": manifest.lineage.model_copy(update={"data": data})}
    )
    folder = store.path(version)
    tmp = folder / (MANIFEST_FILE + ".tmp")
    write_json(tmp, updated.model_dump(mode="json"))
    tmp.replace(folder / MANIFEST_FILE)
    return data
