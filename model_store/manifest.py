"""manifest.json of a model version: what it is, how it was made, how to check it."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from rankgate.config_files import Strict

ONNX_FILE = "model.onnx"
BOOSTER_FILE = "booster.txt"
PARITY_INPUTS_FILE = "parity_inputs.npy"
MANIFEST_FILE = "manifest.json"
MAX_PARITY_DIFF = 1e-5


class ManifestFeature(Strict):
    name: str
    view: str
    """Feast feature view the value is read from."""
    field: str
    group: str


class TrainingData(Strict):
    fingerprint: str
    """sha256 of the training matrix and labels, as float32/int8 bytes."""
    rows: int
    positives: int
    holdout_rows: int
    holdout_positives: int
    split: str


class Metrics(Strict):
    auc: float | None
    """Held-out ROC AUC; None when the hold-out has a single class."""
    log_loss: float


class OnnxInfo(Strict):
    input_name: str
    output_name: str
    opset: int
    parity_max_abs_diff: float
    """max |ONNX - native| probability over the parity inputs."""


class Manifest(Strict):
    name: str
    version: str
    created_at: datetime
    params: dict[str, float | int | str | bool]
    features: list[ManifestFeature]
    artifacts: dict[str, str] = Field(description="file name -> sha256")
    training_data: TrainingData
    metrics: Metrics
    onnx: OnnxInfo
    libraries: dict[str, str]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def feature_views(self) -> set[str]:
        return {f.view for f in self.features}
