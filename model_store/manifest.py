"""manifest.json of a model version: what it is, how it was made, how to check it."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from features.spec import Encoding, FeatureSpec, Source
from rankgate.core.config_files import Strict
from rankgate.governance.residency import DataOrigin

ONNX_FILE = "model.onnx"
PARITY_INPUTS_FILE = "parity_inputs.npy"
MANIFEST_FILE = "manifest.json"
RETRIEVAL_FILE = "retrieval.npz"
"""The version's item embeddings for retrieval (model_store/embeddings.py), when it has them."""
REFERENCE_FILE = "drift_reference.json"
"""The version's drift reference (model_store/reference.py), when it has one."""
MAX_PARITY_DIFF = 1e-5
BoosterKind = Literal["lightgbm", "xgboost", "sklearn"]
# The file name of a native tree model beside model.onnx, by kind.
BOOSTER_FILES: dict[str, str] = {
    "lightgbm": "booster.txt",
    "xgboost": "booster.json",
    "sklearn": "booster.joblib",
}


class ManifestFeature(Strict):
    """One input column, resolved against the project's Feast registry."""

    name: str
    source: Source = "user"
    view: str | None
    """Feast feature view the value is read from (None: a request-context feature)."""
    field: str
    """The view's field (may contain {item_id}), or the context key."""
    encoding: Encoding = "number"
    group: str

    @classmethod
    def of(cls, spec: FeatureSpec) -> ManifestFeature:
        return cls(
            name=spec.name,
            source=spec.source,
            view=spec.view,
            field=spec.field,
            encoding=spec.encoding,
            group=spec.group,
        )

    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.name, self.source, self.view, self.field, self.encoding, self.group)


class TrainingData(Strict):
    fingerprint: str
    """sha256 of the training matrix and labels, as float32/int8 bytes."""
    rows: int
    positives: int
    holdout_rows: int
    holdout_positives: int
    split: str


class Metrics(Strict):
    """Held-out metrics: the two rankgate computes when it trains, and any others the
    engineer reports when registering (`model register --metrics F`)."""

    auc: float | None = Field(None, ge=0, le=1)
    """Held-out ROC AUC; None when the hold-out has a single class (or not reported)."""
    log_loss: float | None = Field(None, ge=0)
    """Held-out log loss; None when not reported."""
    others: dict[str, float] = Field(default_factory=dict)
    """The engineer's own metrics by name (ndcg@10, recall, ...): finite numbers."""

    @model_validator(mode="before")
    @classmethod
    def _own_metrics(cls, data: Any) -> Any:
        """A metrics file lists any names: the ones not known here go to `others`."""
        if not isinstance(data, dict):
            return data
        known = {"auc", "log_loss", "others"}
        own = {k: v for k, v in data.items() if k not in known}
        if not own:
            return data
        return {k: v for k, v in data.items() if k in known} | {
            "others": {**data.get("others", {}), **own}
        }

    @field_validator("others")
    @classmethod
    def _finite(cls, others: dict[str, float]) -> dict[str, float]:
        for name, value in others.items():
            if not math.isfinite(value):
                raise ValueError(f"{name}: not a finite number")
        return others

    def shown(self) -> str:
        """Every metric, for `model list`: "auc 0.52, log_loss 0.0321, ndcg@10 0.31"."""
        named = {"auc": self.auc, "log_loss": self.log_loss, **self.others}
        return ", ".join(f"{k} {v:.4g}" for k, v in named.items() if v is not None) or "-"


class OnnxInfo(Strict):
    input_name: str
    output_name: str
    """The output scored: a (rows, 2) probability output's second column, or a
    (rows,) / (rows, 1) score."""
    opset: int
    parity_max_abs_diff: float | None
    """max |ONNX - native| probability over the parity inputs (None: no native model)."""


class Booster(Strict):
    """The native tree model beside the ONNX file: SHAP TreeExplainer explains it."""

    kind: BoosterKind
    file: str


class TrainingWindow(Strict):
    """The time range of the rows a version learned from, both ends included (UTC)."""

    start: datetime
    end: datetime

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, moment: datetime) -> datetime:
        """A time without an offset is UTC."""
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    @model_validator(mode="after")
    def _ordered(self) -> TrainingWindow:
        if self.end < self.start:
            raise ValueError("end is before start")
        return self

    def __str__(self) -> str:
        return f"{shown_time(self.start)}..{shown_time(self.end)}"


def shown_time(moment: datetime) -> str:
    """An ISO 8601 UTC time as rankgate prints it: 2026-11-30T12:00:00Z."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class DataLineage(Strict):
    """Where a version's training data came from: the regions of the people in it, how
    many rows, a digest of the input tables. Residency rules in policy.yaml read the
    regions (rankgate/governance/residency.py)."""

    regions: list[str]
    """Data regions of the people in the rows it was built from (sorted)."""
    source: Literal["region column", "declared"]
    """`region column`: read by `model train` from the project's `data_regions`;
    `declared`: given to `model register --data-regions`."""
    rows_by_region: dict[str, int] | None = None
    """Rows per data region (`model train`; None: declared)."""
    rows_without_region: int = Field(0, ge=0)
    """Rows whose person has no region: a version with any is accepted nowhere a
    residency rule applies."""
    cleared_for_transfer: list[str] = Field(default_factory=list)
    """Of `regions`, those whose data was cleared for transfer to other regions."""
    rows: int | None = Field(None, ge=0)
    """Rows of training data (None: not declared)."""
    tables: dict[str, str] = Field(default_factory=dict)
    """Input table -> sha256 of its file(s)."""
    digest: str | None = None
    """sha256 over `tables` (names and digests, sorted): one value for the audit record
    (None: no tables given)."""

    @model_validator(mode="after")
    def _cleared_are_regions(self) -> DataLineage:
        stray = [r for r in self.cleared_for_transfer if r not in self.regions]
        if stray:
            raise ValueError(f"cleared_for_transfer: {stray[0]!r} is not one of its regions")
        return self

    def origin(self) -> DataOrigin:
        return DataOrigin(
            frozenset(self.regions),
            frozenset(self.cleared_for_transfer),
            complete=self.rows_without_region == 0,
        )

    def shown(self) -> str:
        """One line: "EU 4,985 + US 5,015 rows (US cleared), sha256 1a2b3c4d5e6f"
        (the regions' rows, those cleared for transfer, the input tables' digest)."""
        if self.rows_by_region is not None:
            regions = " + ".join(f"{r} {n:,}" for r, n in sorted(self.rows_by_region.items()))
            if self.rows_without_region:
                regions += f" + no region {self.rows_without_region:,}"
            regions += " rows"
        else:
            regions = ",".join(self.regions) + " (declared)"
            if self.rows is not None:
                regions += f", {self.rows:,} rows"
        if self.cleared_for_transfer:
            regions += f" ({','.join(self.cleared_for_transfer)} cleared)"
        return regions + (f", sha256 {self.digest[:12]}" if self.digest else "")


class Lineage(Strict):
    """Where the version came from."""

    made_by: Literal["rankgate model train", "rankgate model register"]
    project: str
    """The project (rankgate.yaml `name`) it was registered against."""
    onnx_source: str | None = None
    """The ONNX file it was registered from (register)."""
    features_source: str | None = None
    """The FEATURES.yaml of its inputs."""
    trained_on: TrainingWindow | None = None
    """The times of the rows it learned from: declared (`model register --trained-on`)
    or, for `model train`, its training rows' (the held-out tail excluded). None: not
    declared, or registered before windows were recorded."""
    data: DataLineage | None = None
    """Regions, rows and input tables of its training data (None: no lineage recorded;
    a residency rule accepts no such version)."""

    def origin(self) -> DataOrigin | None:
        """What residency reads (None: no lineage recorded)."""
        return self.data.origin() if self.data is not None else None

    def shown(self) -> str:
        """The data lineage in a line, or that there is none."""
        if self.data is None:
            return "no lineage recorded"
        window = f", {self.trained_on}" if self.trained_on is not None else ""
        return self.data.shown() + window


class Manifest(Strict):
    name: str
    version: str
    created_at: datetime
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    features: list[ManifestFeature]
    artifacts: dict[str, str] = Field(description="file name -> sha256")
    training_data: TrainingData | None = None
    """None for a model trained outside rankgate."""
    metrics: Metrics | None = None
    onnx: OnnxInfo
    booster: Booster | None = None
    """None: no native tree model, so no SHAP explanations (`explainer_unavailable`)."""
    lineage: Lineage
    libraries: dict[str, str]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def feature_views(self) -> set[str]:
        return {f.view for f in self.features if f.view is not None}

    @property
    def specs(self) -> list[FeatureSpec]:
        return [f.spec() for f in self.features]
