"""The one feature-vector builder, shared by training, serving and replay.

A model declares its inputs, in the order of its ONNX input's columns, in a
FEATURES.yaml (`ModelInput`): each is a Feast feature reference `view:field` of a
user view or of the item view, or a request-context feature `context: name`. A
user-view field may name a field per candidate item with the `{item_id}`
placeholder (`customer_affinity:aff_{item_id}` reads `aff_17` for item 17). A
model row is one (user, candidate item) pair; `build_matrix` turns
the user's feature values, the item table and the request context into the
float32 matrix the model reads, so training and serving cannot drift apart.

Encodings (what an externally trained model must have been trained on):
  number  the value as float32;
  hash    a stable code of the value's text: int(sha256(utf-8 text).hex()[:5], 16),
          below 2**20 and so exact in float32. It needs no vocabulary: an unseen
          category still gets a stable code.
A missing value (no row, no field, no context key) is -1 in both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from features.spec import (
    Encoding,
    FeatureSpec,
    ViewInfo,
    template_fields,
)
from rankgate.core.project import ItemId

MISSING = -1.0


@lru_cache(maxsize=65536)
def hash_code(text: str) -> float:
    return float(int(hashlib.sha256(text.encode()).hexdigest()[:5], 16))


def encode(value: Any, encoding: Encoding) -> float:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return MISSING
    if encoding == "hash":
        return hash_code(str(value))
    try:
        return float(value)
    except (TypeError, ValueError):
        return MISSING


def encode_all(values: Sequence[Any], encoding: Encoding) -> np.ndarray:
    """`encode` of each value (float64): numbers in one numpy conversion, where they
    all are numbers or missing (None and NaN become MISSING, as in `encode`)."""
    if encoding == "number":
        try:
            column = np.array(values, dtype=np.float64)
        except (TypeError, ValueError):
            column = None
        if column is not None and column.shape == (len(values),):
            column[np.isnan(column)] = MISSING
            return column
    return np.array([encode(value, encoding) for value in values], dtype=np.float64)


class ItemTable:
    """The item view's rows for the whole catalogue, encoded per column on first use."""

    def __init__(self, rows: Mapping[ItemId, Mapping[str, Any]]) -> None:
        self.item_ids: list[ItemId] = sorted(rows, key=lambda i: (str(type(i)), i))
        self._rows = rows
        self._row_of = {item_id: pos for pos, item_id in enumerate(self.item_ids)}
        self._columns: dict[tuple[str, str], np.ndarray] = {}
        # Fingerprint of the table, computed once: an audit record names the table it used.
        canonical = json.dumps(
            [[i, dict(sorted(rows[i].items()))] for i in self.item_ids], default=str
        )
        self.digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row_of

    def __len__(self) -> int:
        return len(self.item_ids)

    def row(self, item_id: ItemId) -> Mapping[str, Any]:
        """One item's attributes, as read."""
        return self._rows[item_id]

    def over(self, catalogue: Sequence[ItemId]) -> ItemTable:
        """This table's rows of `catalogue`'s items; an item it lacks has no attributes."""
        return ItemTable({i: self._rows.get(i, {}) for i in catalogue})

    def rows(self, item_ids: Sequence[ItemId]) -> np.ndarray:
        return np.fromiter((self._row_of[i] for i in item_ids), dtype=np.int64, count=len(item_ids))

    def column(self, field: str, encoding: Encoding) -> np.ndarray:
        """One field of every item, encoded (float32, catalogue order)."""
        key = (field, encoding)
        column = self._columns.get(key)
        if column is None:
            column = encode_all([self._rows[i].get(field) for i in self.item_ids], encoding).astype(
                np.float32
            )
            self._columns[key] = column
        return column


def user_fields(
    specs: Sequence[FeatureSpec], views: Mapping[str, ViewInfo]
) -> dict[str, list[str]]:
    """Fields to read per user view for these features (the Feast reads a request needs)."""
    needed: dict[str, list[str]] = {}
    for spec in specs:
        if spec.source != "user" or spec.view is None:
            continue
        fields = (
            template_fields(spec.field, views[spec.view].fields) if spec.per_item else [spec.field]
        )
        have = needed.setdefault(spec.view, [])
        have += [f for f in fields if f not in have]
    return needed


def build_matrix(
    specs: Sequence[FeatureSpec],
    user: Mapping[str, Any],
    items: ItemTable,
    item_ids: Sequence[ItemId],
    context: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Model input for one user and candidate items: float32, shape (len(item_ids), len(specs)).

    `user` maps Feast field names (e.g. "age", "aff_17") to values;
    `context` maps context keys to the request's values; an absent one is missing (-1).
    """
    rows = items.rows(item_ids)
    matrix = np.empty((len(rows), len(specs)), dtype=np.float32)
    for col, spec in enumerate(specs):
        if spec.source == "item":
            matrix[:, col] = items.column(spec.field, spec.encoding)[rows]
        elif spec.source == "context":
            matrix[:, col] = encode((context or {}).get(spec.field), spec.encoding)
        elif spec.per_item:
            matrix[:, col] = encode_all(
                [user.get(spec.field_for(i)) for i in item_ids], spec.encoding
            )
        else:
            matrix[:, col] = encode(user.get(spec.field), spec.encoding)
    return matrix
