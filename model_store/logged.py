"""A project's interaction log as model rows: what training, export, drift references,
off-policy evaluation and retrieval's item embeddings read.

The rows are built as features.vector.build_matrix (the function the online ranker
calls) would have built them at each logged impression, from the offline sources
of the project's feature views: a user view's row as of the impression, the item
view's latest rows (the snapshot the online store serves). A streaming view has no
offline snapshot: its value at each logged impression is computed from the log
itself, point in time (features.history).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from features.applied import AppliedView
from features.history import field_names, view_values
from features.offline import LogMatrix, UserRows, item_rows
from features.spec import FeatureSpec
from features.tables import load_catalogue, read_table, source_path
from features.vector import ItemTable
from model_store.embeddings import ItemEmbeddings, Score, build_artifact, read_vectors
from model_store.register import ReferenceRows
from rankgate.core.errors import ModelStoreError
from rankgate.core.project import Project


@dataclass
class TrainingSet:
    matrix: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.matrix, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int8).tobytes())
        return digest.hexdigest()


def latest_rows(view: AppliedView, project: Project, key: str) -> pd.DataFrame:
    """The newest row per entity of a view's offline source, indexed by its join key."""
    frame = read_table(source_path(view, project))
    stamp = view.timestamp_field
    if stamp and stamp in frame.columns:
        frame = frame.sort_values(stamp, kind="stable")
    return frame.drop_duplicates(key, keep="last").set_index(key)


def load_item_table(project: Project, views: Sequence[AppliedView]) -> ItemTable:
    """The item view's offline rows as an ItemTable (empty rows without an item view)."""
    name = project.spec.item_view
    view = next((v for v in views if v.name == name), None)
    if view is None:
        return ItemTable({})
    items = latest_rows(view, project, project.spec.item.join_key)
    return ItemTable({project.item_id(i): row for i, row in items.to_dict("index").items()})


def user_rows(view: AppliedView, project: Project) -> UserRows:
    """A user view's offline rows, every row kept: a log joins them as of each impression."""
    key = project.spec.user.join_key
    frame = read_table(source_path(view, project))
    return UserRows.of(frame[frame[key].notna()], key, view.timestamp_field)


def item_ids_of(project: Project, values: pd.Series) -> np.ndarray:
    """A log column of item ids as the project's type (int64, or str objects)."""
    if project.spec.item.id_type == "int":
        return values.to_numpy(dtype=np.int64)
    return values.astype(str).to_numpy(dtype=object)


def log_tables(
    project: Project, views: Sequence[AppliedView], specs: Sequence[FeatureSpec]
) -> tuple[dict[str, UserRows], ItemTable, dict[str, AppliedView]]:
    """What a log's rows are joined with: the user views the specs read (every offline
    row), the item table, and the streaming views the specs read (by name)."""
    by_name = {v.name: v for v in views}
    user_views = {s.view for s in specs if s.source == "user" and s.view}
    users = {
        name: user_rows(by_name[name], project)
        for name in sorted(user_views - set(project.streaming))
    }
    streaming = {name: by_name[name] for name in sorted(user_views & set(project.streaming))}
    return users, load_item_table(project, views), streaming


CHUNK_ROWS = 1_000_000
"""Log rows built per step: what one step holds besides the matrix is bounded by it."""


@dataclass
class LoggedRows:
    """A log's rows and what a model would have read at each: the user views' offline
    rows as of the row's time, the streaming views' values at the row's time, the row's
    context (features/offline.py). Training, export, drift references and off-policy
    evaluation read logs through this one class."""

    project: Project
    logs: pd.DataFrame
    """The log sorted by time (when it has a time column), rows of unknown items dropped."""
    item_ids: np.ndarray
    """The rows' item ids, as the project's type."""
    users: dict[str, UserRows]
    items: ItemTable
    contexts: list[str]
    streaming: dict[str, AppliedView]
    """The streaming views the specs read, by name."""

    @classmethod
    def read(
        cls,
        project: Project,
        views: Sequence[AppliedView],
        data_dir: Path,
        specs: Sequence[FeatureSpec],
        path: Path | None = None,
        required: Sequence[str] = (),
    ) -> LoggedRows:
        """The project's interaction log (or `path`, with the same columns); ModelStoreError
        names the field when a needed column (the `required` fields of `interactions`
        among them) is not declared or not in the log."""
        spec = project.spec.interactions
        if spec is None or spec.user_column is None:
            raise ModelStoreError(
                f"{project.file}: field 'interactions': this needs a log with a user column; "
                "train elsewhere and use `rankgate model register`",
                422,
            )
        for name in required:
            if getattr(spec, name) is None:
                raise ModelStoreError(
                    f"{project.file}: field 'interactions.{name}': not declared", 422
                )
        logs = read_table(path or project.path(spec.path, data_dir))
        wanted = [spec.user_column, spec.item_column, spec.outcome_column]
        wanted += [getattr(spec, name) for name in required]
        missing = [c for c in wanted if c not in logs]
        if missing:
            raise ModelStoreError(
                f"{project.file}: field 'interactions': the log has no column {missing[0]!r}", 422
            )
        if spec.time_column and spec.time_column in logs:
            logs = logs.sort_values(spec.time_column, kind="stable")
        logs = logs.reset_index(drop=True)
        users, items, streaming = log_tables(project, views, specs)
        item_ids = item_ids_of(project, logs[spec.item_column])
        if len(items) and any(s.source == "item" for s in specs):
            known = item_rows(items, item_ids) >= 0
            if not known.all():
                logs, item_ids = logs[known].reset_index(drop=True), item_ids[known]
        contexts = [c for c in project.context if c in logs.columns]
        if streaming and not (spec.time_column and spec.time_column in logs):
            raise ModelStoreError(
                f"{project.file}: field 'interactions.time_column': a model that reads the "
                f"streaming view {next(iter(streaming))!r} is trained on its value at each "
                "impression's time, so the log needs a time column",
                422,
            )
        return cls(project, logs, item_ids, users, items, contexts, streaming)

    @property
    def user_column(self) -> str:
        spec = self.project.spec.interactions
        assert spec is not None and spec.user_column is not None
        return spec.user_column

    @cached_property
    def times(self) -> np.ndarray | None:
        """The rows' times (int64 ns, UTC); None: the log has no time column."""
        spec = self.project.spec.interactions
        assert spec is not None
        if not spec.time_column or spec.time_column not in self.logs:
            return None
        stamps = pd.to_datetime(self.logs[spec.time_column], utc=True)
        return stamps.to_numpy("datetime64[ns]").astype(np.int64)

    def streamed(
        self, spec: FeatureSpec, query_rows: np.ndarray, query_items: np.ndarray
    ) -> np.ndarray:
        """A streaming input's value for log rows `query_rows`, scoring `query_items`
        (the view's value just before the row's time; features/history.py)."""
        project = self.project
        view = project.streaming[spec.view or ""]
        if view.per == "item":
            if spec.per_item:
                counted: np.ndarray | None = query_items
            else:  # one item's field, named outright
                of = field_names(view, self.items.item_ids or list(dict.fromkeys(self.item_ids)))
                counted = np.full(len(query_rows), of.get(spec.field), dtype=object)
        else:
            counted = None
        ttl = self.streaming[view.view].ttl_s
        return view_values(
            project, view, ttl, self.logs, self.item_ids, query_rows, counted
        ).astype(np.float32)

    def batches(
        self, specs: Sequence[FeatureSpec], chunk_rows: int = CHUNK_ROWS
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Each row's model input as serving would have built it then (float32,
        rows x specs), `chunk_rows` rows at a time: (the rows, their matrix)."""
        builder = LogMatrix(specs, self.users, self.items)
        n = len(self.logs)
        every = np.arange(n)
        streamed = {
            col: self.streamed(spec, every, self.item_ids)
            for col, spec in enumerate(specs)
            if spec.view in self.streaming
        }
        times = self.times
        keys = self.logs[self.user_column].to_numpy()
        contexts = {c: self.logs[c].to_numpy() for c in self.contexts}
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            yield (
                rows,
                builder.rows(
                    keys[rows],
                    self.item_ids[rows],
                    None if times is None else times[rows],
                    {c: values[rows] for c, values in contexts.items()},
                    {col: values[rows] for col, values in streamed.items()},
                ),
            )

    def matrix(self, specs: Sequence[FeatureSpec]) -> np.ndarray:
        """Every row's model input (float32, rows x specs)."""
        matrix = np.empty((len(self.logs), len(specs)), dtype=np.float32)
        for rows, part in self.batches(specs):
            matrix[rows] = part
        return matrix


def training_set(
    project: Project,
    views: Sequence[AppliedView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
) -> TrainingSet:
    logged = LoggedRows.read(project, views, data_dir, specs)
    return logged_training_set(logged, specs)


def logged_training_set(logged: LoggedRows, specs: Sequence[FeatureSpec]) -> TrainingSet:
    spec = logged.project.spec.interactions
    assert spec is not None
    logs = logged.logs
    return TrainingSet(
        matrix=logged.matrix(specs),
        labels=logs[spec.outcome_column].to_numpy(dtype=np.int8),
        timestamps=logged.times if logged.times is not None else np.arange(len(logs)),
    )


def item_embeddings(
    score: Score,
    specs: Sequence[FeatureSpec],
    logged: LoggedRows,
    dataset: TrainingSet,
    views: Sequence[AppliedView],
    data_dir: Path,
    vectors_file: Path | None = None,
) -> ItemEmbeddings:
    """A version's retrieval artifact over the catalogue: item embeddings distilled from
    its ranker (or read from `vectors_file`), popularity from the log
    (model_store/embeddings.py)."""
    project = logged.project
    catalogue = load_catalogue(project, list(views), data_dir)
    vectors = None
    if vectors_file is not None:
        found = read_vectors(vectors_file, project.spec.item.join_key, catalogue, project.item_id)
        vectors = (found, vectors_file.name)
    return build_artifact(
        score,
        specs,
        dataset.matrix,
        logged.items,
        catalogue,
        log=(dataset.labels, logged.item_ids),
        vectors=vectors,
    )


class ProjectLog:
    """The project's interaction log as rows of a version's inputs, read at most once
    (a registered version's drift reference and retrieval artifact both need it)."""

    def __init__(self, project: Project, views: Sequence[AppliedView], data_dir: Path) -> None:
        self.project, self.views, self.data_dir = project, list(views), data_dir
        self._read: tuple[LoggedRows, TrainingSet] | None = None

    @property
    def exists(self) -> bool:
        spec = self.project.spec.interactions
        return spec is not None and spec.user_column is not None

    def rows(self, specs: Sequence[FeatureSpec]) -> tuple[LoggedRows, TrainingSet] | None:
        if not self.exists:
            return None
        if self._read is None:
            logged = LoggedRows.read(self.project, self.views, self.data_dir, specs)
            self._read = (logged, logged_training_set(logged, specs))
        return self._read

    def reference(self, specs: Sequence[FeatureSpec]) -> ReferenceRows | None:
        read = self.rows(specs)
        return None if read is None else ReferenceRows(read[1].matrix, "project interaction log")

    def retrieval(
        self, score: Score, specs: Sequence[FeatureSpec], vectors_file: Path | None
    ) -> ItemEmbeddings | None:
        """The artifact (None without a log: the prototypes are logged people)."""
        read = self.rows(specs)
        if read is None:
            if vectors_file is not None:
                raise ModelStoreError(
                    f"--item-embeddings: {self.project.file}: field 'interactions': retrieval "
                    "fits a person's vector on logged people; the project has no log",
                    422,
                )
            return None
        return item_embeddings(score, specs, *read, self.views, self.data_dir, vectors_file)
