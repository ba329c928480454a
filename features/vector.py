"""The one feature-vector builder, shared by training and serving.

A model row is one (user, candidate item) pair. Its columns are named by
`FeatureSpec`s, each read from one field of one Feast view; the affinity column
reads the field of the candidate (`affinity_<item_id>`). Training
(model_store.train) and the online ranker both call `build_matrix`, so the two
cannot drift apart.

Hashed categorical attributes (32 hex digits in the logs) are encoded as a
number taken from the hash itself: `int(hex[:5], 16)`, below 2**20 and so
exact in float32 (as are the midpoints between two codes that tree split
thresholds fall on). The encoding needs no vocabulary: an unseen category still
gets a stable code. Missing values encode as -1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from features.definitions import ITEM_CONTEXT, USER_ITEM_AFFINITY, VIEW_FIELDS, VISITOR_PROFILE

MISSING = -1.0
AFFINITY_FIELD_TEMPLATE = "affinity_{item_id}"


@dataclass(frozen=True)
class FeatureSpec:
    """One model input column: where it comes from and how to read it."""

    name: str
    view: str
    field: str
    """Field of the view; for the per-item affinity, the template `affinity_{item_id}`."""
    group: str
    """Feature group, keys the plain-language reason templates."""
    categorical: bool = False


FEATURES: dict[str, FeatureSpec] = {
    spec.name: spec
    for spec in [
        *[
            FeatureSpec(f"user_feature_{i}", VISITOR_PROFILE, f"user_feature_{i}", "profile", True)
            for i in range(4)
        ],
        FeatureSpec("item_price", ITEM_CONTEXT, "item_feature_0", "item"),
        *[
            FeatureSpec(f"item_feature_{i}", ITEM_CONTEXT, f"item_feature_{i}", "item", True)
            for i in range(1, 4)
        ],
        FeatureSpec("user_item_affinity", USER_ITEM_AFFINITY, AFFINITY_FIELD_TEMPLATE, "affinity"),
    ]
}
ALL_FEATURE_NAMES = list(FEATURES)


@lru_cache(maxsize=4096)
def affinity_field(item_id: int) -> str:
    """Field of the affinity view that holds the user's affinity to `item_id`."""
    return AFFINITY_FIELD_TEMPLATE.format(item_id=item_id)


def resolve(names: Sequence[str]) -> list[FeatureSpec]:
    """FeatureSpecs for names; KeyError names the first unknown feature."""
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise KeyError(unknown[0])
    return [FEATURES[n] for n in names]


def encode(value: Any, categorical: bool) -> float:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return MISSING
    if categorical:
        return float(int(str(value)[:5], 16))
    return float(value)


class ItemTable:
    """Encoded item-view columns of the whole catalogue, built once and cached."""

    def __init__(self, rows: Mapping[int, Mapping[str, Any]]) -> None:
        self.item_ids = np.array(sorted(rows), dtype=np.int64)
        self._row_of = {int(item_id): pos for pos, item_id in enumerate(self.item_ids)}
        item_specs = [s for s in FEATURES.values() if s.view == ITEM_CONTEXT]
        self._column_of = {spec.name: col for col, spec in enumerate(item_specs)}
        self.values = np.array(
            [
                [encode(rows[int(i)].get(s.field), s.categorical) for s in item_specs]
                for i in self.item_ids
            ],
            dtype=np.float32,
        ).reshape(len(self.item_ids), len(item_specs))
        # Fingerprint of the encoded table, computed once: an audit record names
        # the table it used.
        self.digest = hashlib.sha256(self.item_ids.tobytes() + self.values.tobytes()).hexdigest()[
            :16
        ]

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._row_of

    def rows(self, item_ids: Sequence[int]) -> np.ndarray:
        return np.array([self._row_of[int(i)] for i in item_ids], dtype=np.int64)

    def column(self, name: str) -> int:
        return self._column_of[name]


def user_fields(specs: Sequence[FeatureSpec]) -> dict[str, list[str]]:
    """Fields to read per user view for these features (the Feast reads a request needs)."""
    needed: dict[str, list[str]] = {}
    for spec in specs:
        if spec.view == ITEM_CONTEXT:
            continue
        fields = (
            list(VIEW_FIELDS[spec.view]) if spec.field == AFFINITY_FIELD_TEMPLATE else [spec.field]
        )
        needed.setdefault(spec.view, [])
        needed[spec.view] += [f for f in fields if f not in needed[spec.view]]
    return needed


def build_matrix(
    specs: Sequence[FeatureSpec],
    user: Mapping[str, Any],
    items: ItemTable,
    item_ids: Sequence[int],
) -> np.ndarray:
    """Model input for one user and candidate items: float32, shape (len(item_ids), len(specs)).

    `user` maps Feast field names (e.g. "user_feature_0", "affinity_17") to values;
    an absent field is missing (-1).
    """
    rows = items.rows(item_ids)
    matrix = np.empty((len(rows), len(specs)), dtype=np.float32)
    for col, spec in enumerate(specs):
        if spec.view == ITEM_CONTEXT:
            matrix[:, col] = items.values[rows, items.column(spec.name)]
        elif spec.field == AFFINITY_FIELD_TEMPLATE:
            values = (user.get(affinity_field(int(i))) for i in item_ids)
            matrix[:, col] = [MISSING if v is None else v for v in values]
        else:
            matrix[:, col] = encode(user.get(spec.field), spec.categorical)
    return matrix
