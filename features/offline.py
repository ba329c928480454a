"""The offline half of the one feature builder: a log's model rows, column by column.

`build_matrix` (features/vector.py) builds the rows of one request: one person, a
list of candidates. A log holds millions of (person, item, time) rows; building
them one request at a time runs at a few thousand rows a second. `LogMatrix`
builds the same float32 values a column at a time: per input, one lookup of every
row's person or item and one encoding of the distinct values (`encode_column`),
so a row costs a few array operations whatever the log's size. A test keeps its
rows equal, bit for bit, to `build_matrix` on the same person's values.

Point in time: a row reads a user view's newest offline row at or before the
row's time (a source that keeps each person's history is joined as of each
impression). A person whose oldest row is newer than the impression (a source
that holds one snapshot per person, as most exports do) reads that snapshot: the
values the online store serves. A streaming view's value is its decayed count at
the row's time, rebuilt from the log (features/history.py). Item attributes are
the catalogue's snapshot, the `ItemTable` every replica holds.

A `LogMatrix` holds the user views' offline rows (their key index and columns);
the log itself may come a batch at a time (`rows` of any slice of a time-sorted
log), so memory is bounded by the batch, not the log. The same function runs on
one batch of a larger log on any machine (Ray Data's `map_batches`, docs/models.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.spec import Encoding, FeatureSpec
from features.vector import MISSING, ItemTable, encode


def encode_column(values: Any, encoding: Encoding) -> np.ndarray:
    """`encode` of every value of a column (float32), each distinct value encoded once:
    numbers in one numpy conversion, anything else through `encode` itself."""
    array = values.to_numpy() if isinstance(values, pd.Series | pd.Index) else np.asarray(values)
    if encoding == "number" and array.dtype.kind in "biuf":
        column = array.astype(np.float64)
        column[np.isnan(column)] = MISSING
        return column.astype(np.float32)
    codes, uniques = pd.factorize(array, use_na_sentinel=True)
    table = np.array([encode(value, encoding) for value in uniques] + [MISSING], dtype=np.float64)
    return table[codes].astype(np.float32)


def item_rows(items: ItemTable, item_ids: Any) -> np.ndarray:
    """Each id's row of the item table (-1: not in the catalogue)."""
    return pd.Index(items.item_ids).get_indexer(pd.Index(np.asarray(item_ids)))


@dataclass
class UserRows:
    """One user view's offline rows, ready to be joined to a log as of each row's time."""

    frame: pd.DataFrame
    """Sorted by key, then time; a default integer index."""
    keys: pd.Index
    """The distinct keys; key k's rows are frame[starts[k]:starts[k + 1]]."""
    starts: np.ndarray
    times: np.ndarray | None
    """Each row's time (int64 ns, UTC); None: the source has one row per key."""

    @classmethod
    def of(cls, frame: pd.DataFrame, key: str, stamp: str | None) -> UserRows:
        order = [key]
        if stamp and stamp in frame.columns:
            times = pd.to_datetime(frame[stamp], utc=True).to_numpy("datetime64[ns]")
            frame, order = frame.assign(_ns=times.astype(np.int64)), [key, "_ns"]
        # Sorted by key, a key's rows are contiguous and its codes ascend.
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
        codes, keys = pd.factorize(frame[key], sort=False)
        starts = np.searchsorted(codes, np.arange(len(keys) + 1))
        unique = len(keys) == len(frame)
        times = None if unique or "_ns" not in frame else frame["_ns"].to_numpy()
        return cls(frame, pd.Index(keys), starts, times)

    def positions(self, keys: Any, times: np.ndarray | None) -> np.ndarray:
        """For each (key, time), the row it reads (-1: the key has no row)."""
        code = self.keys.get_indexer(pd.Index(np.asarray(keys)))
        found = code >= 0
        first = np.where(found, self.starts[np.maximum(code, 0)], -1)
        if self.times is None or times is None:
            return first
        last = self.starts[np.maximum(code, 0) + 1] - 1
        # The newest row at or before each time: one search over (key, time) pairs, each
        # time replaced by its rank among all the times so that a pair fits one int64.
        ranks = np.unique(np.concatenate([self.times, times]), return_inverse=True)[1]
        span = int(ranks.max()) + 2
        frame_codes = np.repeat(np.arange(len(self.keys), dtype=np.int64), np.diff(self.starts))
        frame_pairs = frame_codes * span + ranks[: len(self.times)]
        pairs = np.maximum(code, 0).astype(np.int64) * span + ranks[len(self.times) :]
        at = np.searchsorted(frame_pairs, pairs, side="right") - 1
        # Older than every row of the key: its oldest row (a snapshot source's only one).
        chosen = np.where(at < first, first, np.minimum(at, last))
        return np.where(found, chosen, -1)


def gather(
    frame: pd.DataFrame, field: str, positions: np.ndarray, encoding: Encoding
) -> np.ndarray:
    """`field` of the frame's rows at `positions` (-1: missing), encoded."""
    if field not in frame.columns:
        return np.full(len(positions), MISSING, dtype=np.float32)
    found = positions >= 0
    values = frame[field].to_numpy()
    column = np.full(len(positions), MISSING, dtype=np.float32)
    if found.any():
        column[found] = encode_column(values[positions[found]], encoding)
    return column


@dataclass
class LogMatrix:
    """The offline rows a log's model rows are built from: the user views (point in
    time) and the item table. `rows` builds the matrix of a batch of log rows."""

    specs: Sequence[FeatureSpec]
    users: Mapping[str, UserRows]
    """By view name (the specs' user views that are not streaming)."""
    items: ItemTable

    def rows(
        self,
        user_keys: Any,
        item_ids: Any,
        times: np.ndarray | None,
        context: Mapping[str, Any],
        streamed: Mapping[int, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The model rows of log rows: float32, shape (rows, specs).

        `times` are the rows' times (int64 ns, UTC; None: the log has none);
        `context` maps a context feature to the rows' column of it (absent: missing);
        `streamed` maps the index of a streaming input to its values at each row."""
        n = len(item_ids)
        matrix = np.empty((n, len(self.specs)), dtype=np.float32)
        positions: dict[str, np.ndarray] = {}
        catalogue_rows: np.ndarray | None = None
        ids = np.asarray(item_ids)
        for col, spec in enumerate(self.specs):
            if streamed is not None and col in streamed:
                matrix[:, col] = streamed[col]
            elif spec.source == "item":
                if catalogue_rows is None:
                    catalogue_rows = item_rows(self.items, ids)
                values = self.items.column(spec.field, spec.encoding)
                # An item the catalogue does not hold has no attributes: missing.
                matrix[:, col] = np.where(
                    catalogue_rows >= 0, values[np.maximum(catalogue_rows, 0)], MISSING
                )
            elif spec.source == "context":
                given = context.get(spec.field)
                matrix[:, col] = MISSING if given is None else encode_column(given, spec.encoding)
            else:
                view = self.users.get(spec.view or "")
                if view is None:
                    matrix[:, col] = MISSING
                    continue
                if spec.view not in positions:
                    positions[spec.view or ""] = view.positions(user_keys, times)
                where = positions[spec.view or ""]
                if not spec.per_item:
                    matrix[:, col] = gather(view.frame, spec.field, where, spec.encoding)
                    continue
                # A field per candidate item: each distinct item's field, for its rows.
                codes, distinct = pd.factorize(ids)
                order = np.argsort(codes, kind="stable")
                bounds = np.searchsorted(codes[order], np.arange(len(distinct) + 1))
                for code, item in enumerate(distinct):
                    mine = order[bounds[code] : bounds[code + 1]]
                    matrix[mine, col] = gather(
                        view.frame, spec.field_for(item), where[mine], spec.encoding
                    )
        return matrix
