"""A log's training matrix as a Parquet file: `rankgate features export`.

A model trained outside rankgate learns from the same vectors serving will build
for it when it learns from this file: one row per logged impression, one float32
column per input of a FEATURES.yaml (named as the input, in its order), built by
the log's builder (features/offline.py, the rows `build_matrix` builds online),
beside the row's user key, item, time, outcome and, where the log declares them,
its position and the logging policy's propensity. Written a batch of rows at a
time, so the file may be far larger than what one step holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from features.offline import LogMatrix
from features.spec import FeatureSpec
from model_store.logged import CHUNK_ROWS, LoggedRows, item_ids_of, log_tables
from rankgate.core.errors import ModelStoreError
from rankgate.core.project import Project, load_project

if TYPE_CHECKING:
    import pandas as pd

    from features.applied import AppliedView


@dataclass(frozen=True)
class Exported:
    path: Path
    rows: int
    columns: list[str]


def key_columns(logged: LoggedRows) -> list[str]:
    """The log's columns an exported row carries besides the inputs."""
    spec = logged.project.spec.interactions
    assert spec is not None
    names = [spec.user_column, spec.item_column, spec.time_column, spec.outcome_column]
    names += [spec.position_column, spec.propensity_column]
    return [n for n in dict.fromkeys(names) if n is not None and n in logged.logs]


def export_matrix(
    logged: LoggedRows,
    specs: Sequence[FeatureSpec],
    path: Path,
    chunk_rows: int = CHUNK_ROWS,
    progress: Callable[[int], None] = lambda _rows: None,
) -> Exported:
    """Write the log's rows and their model inputs to `path` (Parquet); ModelStoreError
    names an input whose name is already a column of the log's."""
    keys = key_columns(logged)
    clash = [s.name for s in specs if s.name in keys]
    if clash:
        raise ModelStoreError(
            f"inputs: {clash[0]!r} is also the name of the log's column; rename the input", 422
        )
    names = keys + [s.name for s in specs]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        for where, matrix in logged.batches(specs, chunk_rows):
            frame = logged.logs.iloc[where][keys].reset_index(drop=True)
            frame[keys[1]] = logged.item_ids[where]
            table = pa.Table.from_pandas(frame, preserve_index=False)
            for col, spec in enumerate(specs):
                table = table.append_column(spec.name, pa.array(matrix[:, col]))
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            progress(rows)
        if writer is None:
            raise ModelStoreError("the interaction log has no rows to export", 422)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return Exported(path, rows, names)


class MatrixBatches:
    """The log's builder as a function of one batch of log rows: a frame with the log's
    columns in, the same frame with one float32 column per input out. What a log too
    large for one machine is built with, a block at a time on every node of the Ray
    cluster (Ray Data's `map_batches`, docs/scale.md); the tables it joins (the user
    views, the item table) are read once per worker, when it is made.

    A batch holds any rows of a log for inputs of plain views. A streaming input is a
    count of the person's earlier events: its batch must hold each of its people's
    whole log (Ray Data: `groupby(user column).map_groups`)."""

    def __init__(
        self, project: Project | Path, views: Sequence[AppliedView], specs: Sequence[FeatureSpec]
    ) -> None:
        """`project`: the project, or its folder (what a worker of a cluster is sent)."""
        if isinstance(project, Path):
            project = load_project(project)
        spec = project.spec.interactions
        if spec is None or spec.user_column is None:
            raise ModelStoreError(
                f"{project.file}: field 'interactions': this needs a log with a user column", 422
            )
        self.project, self.specs = project, list(specs)
        users, items, self.streaming = log_tables(project, views, specs)
        self.builder = LogMatrix(self.specs, users, items)
        self.users, self.items = users, items

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pandas as pd

        spec = self.project.spec.interactions
        assert spec is not None and spec.user_column is not None
        if spec.time_column and spec.time_column in batch:
            batch = batch.sort_values(spec.time_column, kind="stable")
        batch = batch.reset_index(drop=True)
        logged = LoggedRows(
            self.project,
            batch,
            item_ids_of(self.project, batch[spec.item_column]),
            self.users,
            self.items,
            [c for c in self.project.context if c in batch.columns],
            self.streaming,
        )
        matrix = logged.matrix(self.specs)
        inputs = pd.DataFrame(
            {s.name: matrix[:, col] for col, s in enumerate(self.specs)}, index=batch.index
        )
        return pd.concat([batch, inputs], axis=1)
