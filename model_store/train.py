"""Train a LightGBM click model on the example logs, convert it to ONNX, register it.

The training matrix is built by features.vector.build_matrix, the same function
the online ranker calls, from the prepared offline tables that are also the
Feast sources of the feature views.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from typing import Any

import lightgbm as lgb
import numpy as np
import onnx
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.metrics import log_loss, roc_auc_score

from features.vector import ALL_FEATURE_NAMES, FeatureSpec, ItemTable, build_matrix, resolve
from model_store.manifest import (
    BOOSTER_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    PARITY_INPUTS_FILE,
    Manifest,
    ManifestFeature,
    Metrics,
    OnnxInfo,
    TrainingData,
)
from model_store.onnx_scoring import PROBABILITIES_OUTPUT, OnnxScorer
from model_store.store import ModelStore, check_version_name, sha256_file, write_json
from rankgate.errors import ModelStoreError, RankgateError
from rankgate.example_data import PreparedData

ONNX_INPUT = "features"
ONNX_OPSET = 15  # highest opset onnxmltools 1.16 converts LightGBM to
PARITY_ROWS = 512
HOLDOUT_FRACTION = 0.2


class TrainParams(BaseModel):
    """LightGBM settings a version may choose (`--params key=value,...`)."""

    model_config = ConfigDict(extra="forbid")

    num_boost_round: int = Field(100, ge=1, le=5000)
    num_leaves: int = Field(15, ge=2, le=1024)
    learning_rate: float = Field(0.05, gt=0, le=1)
    min_child_samples: int = Field(5, ge=1)
    feature_fraction: float = Field(1.0, gt=0, le=1)
    lambda_l2: float = Field(0.0, ge=0)
    seed: int = 7

    def lightgbm(self) -> dict[str, Any]:
        params = self.model_dump(exclude={"num_boost_round"})
        params.update(objective="binary", verbose=-1, num_threads=1, deterministic=True)
        return params


def parse_params(text: str | None) -> TrainParams:
    """`num_leaves=31,learning_rate=0.1` -> TrainParams; errors name the parameter."""
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise RankgateError(f"--params: {part!r} is not key=value", 422)
        values[key.strip()] = yaml.safe_load(raw)
    try:
        return TrainParams.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RankgateError(f"--params: {first['loc'][0]}: {first['msg']}", 422) from exc


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


def load_item_table(data: PreparedData) -> ItemTable:
    items = pd.read_parquet(data.item_context).set_index("item_id")
    return ItemTable({int(i): row for i, row in items.to_dict("index").items()})


def training_set(data: PreparedData, specs: Sequence[FeatureSpec]) -> TrainingSet:
    impressions = pd.read_parquet(data.impressions).sort_values("timestamp", kind="stable")
    impressions = impressions.reset_index(drop=True)
    profiles = pd.read_parquet(data.user_profile).set_index("user_key")
    affinity = pd.read_parquet(data.user_item_affinity).set_index("user_key")
    users = profiles.drop(columns="event_timestamp").join(affinity.drop(columns="event_timestamp"))
    user_rows = users.to_dict("index")
    items = load_item_table(data)
    matrix = np.empty((len(impressions), len(specs)), dtype=np.float32)
    item_ids = impressions["item_id"].to_numpy()
    for key, positions in impressions.groupby("user_key").indices.items():
        matrix[positions] = build_matrix(specs, user_rows[key], items, item_ids[positions])
    return TrainingSet(
        matrix=matrix,
        labels=impressions["click"].to_numpy(dtype=np.int8),
        timestamps=impressions["timestamp"].to_numpy(),
    )


def to_onnx(booster: lgb.Booster, n_features: int) -> onnx.ModelProto:
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = convert_lightgbm(
        booster,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))],
        zipmap=False,
        target_opset=ONNX_OPSET,
    )
    # The converter declares the label output with a fixed batch of 1; make the
    # batch dimension symbolic so onnxruntime does not warn on every call.
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"
    return model


def train(
    store: ModelStore,
    data: PreparedData,
    version: str,
    params: TrainParams,
    feature_names: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Manifest:
    check_version_name(version)
    if store.exists(version):
        raise ModelStoreError(
            f"model version {version!r} already exists at {store.path(version)}; "
            "choose a new version (registered versions are immutable)"
        )
    if not data.is_complete():
        raise ModelStoreError(f"no prepared data in {data.directory}: run `rankgate setup` first")
    try:
        specs = resolve(feature_names or ALL_FEATURE_NAMES)
    except KeyError as exc:
        known = ", ".join(ALL_FEATURE_NAMES)
        raise ModelStoreError(
            f"--features: unknown feature {exc.args[0]!r} (known: {known})", 422
        ) from exc

    progress(f"{version}: building the training matrix ({len(specs)} features)")
    dataset = training_set(data, specs)
    split = int(len(dataset.labels) * (1 - HOLDOUT_FRACTION))
    train_x, hold_x = dataset.matrix[:split], dataset.matrix[split:]
    train_y, hold_y = dataset.labels[:split], dataset.labels[split:]

    progress(f"{version}: training LightGBM ({params.num_boost_round} rounds)")
    booster = lgb.train(
        params.lightgbm(),
        lgb.Dataset(train_x, train_y, feature_name=[s.name for s in specs]),
        num_boost_round=params.num_boost_round,
    )
    hold_p = booster.predict(hold_x)
    metrics = Metrics(
        auc=float(roc_auc_score(hold_y, hold_p)) if len(set(hold_y)) == 2 else None,
        log_loss=float(log_loss(hold_y, hold_p, labels=[0, 1])),
    )

    progress(f"{version}: converting to ONNX and checking parity")
    staging = store.staging_dir()
    try:
        onnx.save_model(to_onnx(booster, len(specs)), str(staging / ONNX_FILE))
        booster.save_model(str(staging / BOOSTER_FILE))
        rng = np.random.default_rng(0)
        parity_rows = rng.choice(
            len(dataset.matrix), min(PARITY_ROWS, len(dataset.matrix)), replace=False
        )
        parity_inputs = dataset.matrix[np.sort(parity_rows)]
        np.save(staging / PARITY_INPUTS_FILE, parity_inputs, allow_pickle=False)
        native = lgb.Booster(model_file=str(staging / BOOSTER_FILE)).predict(parity_inputs)
        onnx_scores = OnnxScorer(staging / ONNX_FILE).score(parity_inputs)
        parity = float(np.max(np.abs(onnx_scores - native)))
        manifest = Manifest(
            name=store.name,
            version=version,
            created_at=datetime.now(UTC),
            params=params.model_dump(),
            features=[
                ManifestFeature(name=s.name, view=s.view, field=s.field, group=s.group)
                for s in specs
            ],
            artifacts={
                name: sha256_file(staging / name)
                for name in (ONNX_FILE, BOOSTER_FILE, PARITY_INPUTS_FILE)
            },
            training_data=TrainingData(
                fingerprint=dataset.fingerprint,
                rows=len(dataset.labels),
                positives=int(dataset.labels.sum()),
                holdout_rows=len(hold_y),
                holdout_positives=int(hold_y.sum()),
                split=f"by time: last {HOLDOUT_FRACTION:.0%} of impressions held out",
            ),
            metrics=metrics,
            onnx=OnnxInfo(
                input_name=ONNX_INPUT,
                output_name=PROBABILITIES_OUTPUT,
                opset=ONNX_OPSET,
                parity_max_abs_diff=parity,
            ),
            libraries={
                lib: package_version(lib)
                for lib in ("lightgbm", "onnxmltools", "onnxruntime", "onnx")
            },
        )
        write_json(staging / MANIFEST_FILE, manifest.model_dump(mode="json"))
        store.register(version, staging)
    except BaseException:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"{version}: registered at {store.path(version)}")
    return manifest


# The two versions `rankgate setup` registers, so promotion has something to promote:
# v1 uses profile and item attributes only; v2 adds the per-item affinity
# (behavioural data) and more trees.
DEFAULT_VERSIONS: dict[str, tuple[list[str], TrainParams]] = {
    "v1": (
        [n for n in ALL_FEATURE_NAMES if n != "user_item_affinity"],
        TrainParams(num_boost_round=60, num_leaves=3, min_child_samples=100, lambda_l2=10.0),
    ),
    "v2": (
        ALL_FEATURE_NAMES,
        TrainParams(
            num_boost_round=200,
            num_leaves=7,
            min_child_samples=200,
            learning_rate=0.02,
            feature_fraction=0.8,
        ),
    ),
}
