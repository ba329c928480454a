"""The drift reference of a version: what its inputs, scores and explanations looked
like on the data it was made from, kept beside the model (`drift_reference.json`,
hashed in the manifest like every artifact).

Per input (by manifest feature name) and for the score: bin edges and the share of
reference rows per bin. A missing value (-1, features.vector.MISSING) is a bin of
its own; a column with few distinct values gets a bin per value; any other column
gets quantile bins (about `BINS`, fewer where quantiles coincide). With a native
model, also the mean |SHAP| per feature group over a sample of rows. The serving
side (serving/observe/drift.py) bins live rows with the same edges and compares.

A version made without data rankgate can read has no reference, and says so: none
is ever invented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from features.spec import FeatureSpec
from features.vector import MISSING
from model_store.manifest import REFERENCE_FILE
from rankgate.core.config_files import Strict
from rankgate.core.errors import ModelStoreError

BINS = 10
SHAP_SAMPLE_ROWS = 500


class Bins(Strict):
    """How one column is binned, and the reference's share of rows per bin.

    Bin 0 holds missing values (-1); bin i >= 1 holds the values v with
    edges[i-2] <= v < edges[i-1] (the first from -inf, the last to +inf)."""

    edges: list[float]
    proportions: list[float]
    """len(edges) + 2 shares summing to 1: missing first."""

    @property
    def size(self) -> int:
        return len(self.edges) + 2

    @classmethod
    def of(cls, values: np.ndarray, bins: int = BINS) -> Bins:
        values = np.asarray(values, dtype=np.float64)
        present = values[values != MISSING]
        distinct = np.unique(present)
        if len(distinct) <= bins:
            # One bin per value: edges halfway between neighbours.
            edges = (distinct[1:] + distinct[:-1]) / 2.0
        else:
            quantiles = np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1])
            edges = np.unique(quantiles)
        counts = np.bincount(bin_index(values, edges), minlength=len(edges) + 2)
        total = max(int(counts.sum()), 1)
        return cls(edges=[float(e) for e in edges], proportions=[c / total for c in counts])


def bin_index(values: np.ndarray, edges: np.ndarray | Sequence[float]) -> np.ndarray:
    """The bin of each value (see `Bins`)."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right") + 1
    return np.where(values == MISSING, 0, index)


class DriftReference(Strict):
    rows: int
    """Reference rows the bins were computed from."""
    source: str
    """What they were: the training matrix, or the project's interaction log."""
    features: dict[str, Bins]
    """Per manifest feature name, in input order."""
    score: Bins
    shap_groups: dict[str, float] | None = None
    """Mean |SHAP| per feature group (FeatureSpec.group) over at most
    SHAP_SAMPLE_ROWS rows; None: no native model to explain."""
    shap_rows: int = Field(0, ge=0)

    @classmethod
    def load(cls, folder: Path) -> DriftReference | None:
        """The reference of the version in `folder` (None: it has none)."""
        path = folder / REFERENCE_FILE
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValueError as exc:
            raise ModelStoreError(f"{path}: not a drift reference ({exc})") from exc

    def write(self, folder: Path) -> Path:
        """Write it into `folder` (whole: a reader never sees half a file)."""
        path = folder / REFERENCE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)
        return path


def compute_reference(
    specs: Sequence[FeatureSpec],
    matrix: np.ndarray,
    scores: np.ndarray,
    source: str,
    explain: Callable[[np.ndarray], np.ndarray] | None = None,
) -> DriftReference:
    """The reference of a model scoring `matrix` to `scores`; `explain` (rows ->
    SHAP contributions, rows x features) gives the explanation part."""
    if len(matrix) == 0:
        raise ModelStoreError(f"drift reference: no rows in {source}", 422)
    features = {spec.name: Bins.of(matrix[:, col]) for col, spec in enumerate(specs)}
    shap_groups, shap_rows = None, 0
    if explain is not None:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(matrix), min(SHAP_SAMPLE_ROWS, len(matrix)), replace=False))
        contributions = np.abs(explain(matrix[sample]))
        shap_rows = len(sample)
        sums = group_sums(contributions, [s.group for s in specs])
        shap_groups = {group: value / shap_rows for group, value in sums.items()}
    return DriftReference(
        rows=len(matrix),
        source=source,
        features=features,
        score=Bins.of(np.asarray(scores, dtype=np.float64)),
        shap_groups=shap_groups,
        shap_rows=shap_rows,
    )


def group_sums(absolute: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """Sum over rows of |contribution| per feature group (absolute: rows x features)."""
    per_feature = absolute.sum(axis=0)
    sums: dict[str, float] = {}
    for group, value in zip(groups, per_feature, strict=True):
        sums[group] = sums.get(group, 0.0) + float(value)
    return sums


def native_explain(model_file: Path, kind: Any) -> Callable[[np.ndarray], np.ndarray]:
    """rows -> SHAP contributions of the native model in `model_file`."""
    from model_store.native import contributions, load_native, tree_explainer

    explainer = tree_explainer(load_native(model_file, kind))
    return lambda rows: contributions(explainer, rows)
