"""Train a LightGBM click model on a project's interaction logs, convert it to ONNX,
and register it through the same path as a model trained anywhere else
(model_store.register).

The training matrix is built by features.vector.build_matrix, the function the
online ranker calls, from the offline sources of the project's feature views
(the latest row per entity: the snapshot the online store serves).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import onnx
import pandas as pd
import yaml
from feast import FeatureView
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.metrics import log_loss, roc_auc_score

from features.spec import FeaturesFile, FeatureSpec, ViewInfo, resolve
from features.store import read_table, source_path
from features.vector import ItemTable, build_matrix
from model_store.manifest import Manifest, Metrics, TrainingData
from model_store.register import Candidate, register
from model_store.store import ModelStore, check_version_name
from rankgate.errors import ModelStoreError, RankgateError
from rankgate.project import Project

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


def latest_rows(view: FeatureView, project: Project, key: str) -> pd.DataFrame:
    """The newest row per entity of a view's offline source, indexed by its join key."""
    frame = read_table(source_path(view, project))
    stamp = view.batch_source.timestamp_field if view.batch_source else None
    if stamp and stamp in frame.columns:
        frame = frame.sort_values(stamp, kind="stable")
    return frame.drop_duplicates(key, keep="last").set_index(key)


def load_item_table(project: Project, views: Sequence[FeatureView]) -> ItemTable:
    """The item view's offline rows as an ItemTable (empty rows without an item view)."""
    name = project.spec.item_view
    view = next((v for v in views if v.name == name), None)
    if view is None:
        return ItemTable({})
    items = latest_rows(view, project, project.spec.item.join_key)
    return ItemTable({project.item_id(i): row for i, row in items.to_dict("index").items()})


def training_set(
    project: Project,
    views: Sequence[FeatureView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
) -> TrainingSet:
    spec = project.spec.interactions
    if spec is None or spec.user_column is None:
        raise ModelStoreError(
            f"{project.file}: field 'interactions': training needs a log with a user column; "
            "train elsewhere and use `rankgate model register`",
            422,
        )
    logs = read_table(project.path(spec.path, data_dir))
    missing = [
        c for c in (spec.user_column, spec.item_column, spec.outcome_column) if c not in logs
    ]
    if missing:
        raise ModelStoreError(
            f"{project.file}: field 'interactions': the log has no column {missing[0]!r}", 422
        )
    if spec.time_column and spec.time_column in logs:
        logs = logs.sort_values(spec.time_column, kind="stable")
    logs = logs.reset_index(drop=True)
    users: dict[Any, dict[str, Any]] = {}
    by_name = {v.name: v for v in views}
    for name in sorted({s.view for s in specs if s.source == "user" and s.view}):
        rows = latest_rows(by_name[name], project, project.spec.user.join_key)
        for key, row in rows.to_dict("index").items():
            users.setdefault(key, {}).update(row)
    items = load_item_table(project, views)
    item_ids = [project.item_id(i) for i in logs[spec.item_column]]
    known = np.array([i in items for i in item_ids]) if len(items) else np.ones(len(logs), bool)
    if not known.all() and any(s.source == "item" for s in specs):
        logs, item_ids = (
            logs[known].reset_index(drop=True),
            [i for i, k in zip(item_ids, known, strict=True) if k],
        )
    contexts = [c for c in project.context if c in logs.columns]
    matrix = np.empty((len(logs), len(specs)), dtype=np.float32)
    ids = np.array(item_ids, dtype=object)
    for key, positions in logs.groupby(spec.user_column).indices.items():
        context = logs.loc[positions[0], contexts].to_dict() if contexts else {}
        if contexts:
            for pos in positions:
                context = logs.loc[pos, contexts].to_dict()
                matrix[pos] = build_matrix(specs, users.get(key, {}), items, [ids[pos]], context)
        else:
            matrix[positions] = build_matrix(specs, users.get(key, {}), items, list(ids[positions]))
    return TrainingSet(
        matrix=matrix,
        labels=logs[spec.outcome_column].to_numpy(dtype=np.int8),
        timestamps=logs[spec.time_column].to_numpy()
        if spec.time_column in logs
        else np.arange(len(logs)),
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
    project: Project,
    views: Sequence[FeatureView],
    infos: Mapping[str, ViewInfo],
    data_dir: Path,
    version: str,
    params: TrainParams,
    features: FeaturesFile,
    features_source: str | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Manifest:
    check_version_name(version)
    if store.exists(version):
        raise ModelStoreError(
            f"model version {version!r} already exists at {store.path(version)}; "
            "choose a new version (registered versions are immutable)"
        )
    specs = resolve(features.inputs, infos, project)

    progress(f"{version}: building the training matrix ({len(specs)} features)")
    dataset = training_set(project, views, data_dir, specs)
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

    progress(f"{version}: converting to ONNX and registering")
    rng = np.random.default_rng(0)
    parity_rows = rng.choice(
        len(dataset.matrix), min(PARITY_ROWS, len(dataset.matrix)), replace=False
    )
    with tempfile.TemporaryDirectory(prefix="rankgate-train-") as scratch:
        onnx_path, booster_path = Path(scratch) / "model.onnx", Path(scratch) / "booster.txt"
        onnx.save_model(to_onnx(booster, len(specs)), str(onnx_path))
        booster.save_model(str(booster_path))
        manifest = register(
            store,
            project,
            infos,
            Candidate(
                version=version,
                onnx_path=onnx_path,
                features=features,
                booster=booster_path,
                booster_kind="lightgbm",
                metrics=metrics,
                params=params.model_dump(),
                training_data=TrainingData(
                    fingerprint=dataset.fingerprint,
                    rows=len(dataset.labels),
                    positives=int(dataset.labels.sum()),
                    holdout_rows=len(hold_y),
                    holdout_positives=int(hold_y.sum()),
                    split=f"by time: last {HOLDOUT_FRACTION:.0%} of impressions held out",
                ),
                sample_rows=dataset.matrix[np.sort(parity_rows)],
                made_by="rankgate model train",
                features_source=features_source,
            ),
        )
    progress(f"{version}: registered at {store.path(version)}")
    return manifest
