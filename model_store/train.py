"""Train a click model on a project's interaction logs (LightGBM, or scikit-learn's
LogisticRegression on standardized inputs), convert it to ONNX, and register it
through the same path as a model trained anywhere else (model_store.register).

The training matrix is the log's rows as serving would have built them
(model_store/logged.py); the version's item embeddings for retrieval are
distilled from the trained ranker (model_store/embeddings.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import onnx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.metrics import log_loss, roc_auc_score

from features.applied import AppliedView
from features.spec import FeaturesFile, ViewInfo, resolve
from model_store.lineage import from_nanoseconds, trained_lineage
from model_store.logged import LoggedRows, item_embeddings, logged_training_set
from model_store.manifest import Manifest, Metrics, TrainingData, TrainingWindow
from model_store.register import Candidate, ReferenceRows, register
from model_store.store import ModelStore, check_version_name
from rankgate.core.errors import ModelStoreError, RankgateError
from rankgate.core.project import Project

ONNX_INPUT = "features"
ONNX_OPSET = 15  # highest opset onnxmltools 1.16 converts LightGBM to
Trainer = Literal["lightgbm", "logistic_regression"]
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


class LogisticParams(BaseModel):
    """scikit-learn LogisticRegression settings (`trainer: logistic_regression`)."""

    model_config = ConfigDict(extra="forbid")

    C: float = Field(1.0, gt=0)
    """Inverse of the L2 regularization strength."""
    class_weight: Literal["balanced"] | None = None
    max_iter: int = Field(1000, ge=1, le=100_000)
    tol: float = Field(1e-4, gt=0)
    standardize: bool = True
    """Scale each input to zero mean and unit variance first (a StandardScaler in the
    pipeline): hash codes and counts live on very different scales."""

    def sklearn(self) -> dict[str, Any]:
        return self.model_dump(exclude={"standardize"})


def trainer_params(trainer: Trainer, values: Mapping[str, Any]) -> TrainParams | LogisticParams:
    """The settings of `trainer` (pydantic ValidationError names a bad one)."""
    kind = LogisticParams if trainer == "logistic_regression" else TrainParams
    return kind.model_validate(dict(values))


def parse_params(text: str | None, trainer: Trainer = "lightgbm") -> TrainParams | LogisticParams:
    """`num_leaves=31,learning_rate=0.1` -> the trainer's settings; errors name the parameter."""
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise RankgateError(f"--params: {part!r} is not key=value", 422)
        values[key.strip()] = yaml.safe_load(raw)
    try:
        return trainer_params(trainer, values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RankgateError(f"--params: {first['loc'][0]}: {first['msg']}", 422) from exc


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


@dataclass
class Fitted:
    """A fitted model: its ONNX form, its native file (for parity and SHAP) and what it
    predicts on held-out rows."""

    onnx: onnx.ModelProto
    native_file: str
    booster_kind: Literal["lightgbm", "sklearn"]
    save_native: Callable[[Path], object]
    predict: Callable[[np.ndarray], np.ndarray]
    params: dict[str, float | int | str | bool]
    coefficients: dict[str, float] | None = None
    """Per input, the linear model's coefficient on the standardized input."""


def fit_lightgbm(params: TrainParams, x: np.ndarray, y: np.ndarray, names: list[str]) -> Fitted:
    booster = lgb.train(
        params.lightgbm(),
        lgb.Dataset(x, y, feature_name=names),
        num_boost_round=params.num_boost_round,
    )
    return Fitted(
        onnx=to_onnx(booster, len(names)),
        native_file="booster.txt",
        booster_kind="lightgbm",
        save_native=lambda path: booster.save_model(str(path)),
        predict=lambda m: np.asarray(booster.predict(m), dtype=np.float64),
        params=params.model_dump(),
    )


def fit_logistic(params: LogisticParams, x: np.ndarray, y: np.ndarray, names: list[str]) -> Fitted:
    """LogisticRegression (after a StandardScaler unless `standardize` is off), converted
    with skl2onnx; the native pipeline is kept (joblib) for parity and SHAP's linear
    explainer (model_store.native)."""
    import joblib
    from skl2onnx import to_onnx as sklearn_to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(**params.sklearn())
    steps: list[tuple[str, Any]] = [("scale", StandardScaler())] if params.standardize else []
    pipeline = Pipeline([*steps, ("classifier", classifier)])
    pipeline.fit(x, y)
    model = sklearn_to_onnx(
        pipeline,
        x[:1].astype(np.float32),
        options={LogisticRegression: {"zipmap": False}},
        target_opset=ONNX_OPSET,
    )
    # skl2onnx names the input "X"; rankgate's trained models all read `features`.
    rename_input(model, ONNX_INPUT)
    return Fitted(
        onnx=model,
        native_file="model.joblib",
        booster_kind="sklearn",
        save_native=lambda path: joblib.dump(pipeline, path),
        predict=lambda m: np.asarray(pipeline.predict_proba(m)[:, 1], dtype=np.float64),
        params={
            "trainer": "logistic_regression",
            **params.model_dump(exclude_none=True),
        },
        coefficients=dict(zip(names, (float(c) for c in classifier.coef_[0]), strict=True)),
    )


def rename_input(model: onnx.ModelProto, name: str) -> None:
    """Give the model's single graph input `name` (and every node that reads it)."""
    old = model.graph.input[0].name
    model.graph.input[0].name = name
    for node in model.graph.node:
        for n, value in enumerate(node.input):
            if value == old:
                node.input[n] = name


def trained_window(logged: LoggedRows, split: int) -> TrainingWindow | None:
    """The times of the first `split` rows (the ones fitted on: the log is in time
    order); None when the log has no times."""
    times = logged.times
    if times is None or split == 0:
        return None
    return TrainingWindow(
        start=from_nanoseconds(times[:split].min()),
        end=from_nanoseconds(times[:split].max(), up=True),
    )


def train(
    store: ModelStore,
    project: Project,
    views: Sequence[AppliedView],
    infos: Mapping[str, ViewInfo],
    data_dir: Path,
    version: str,
    params: TrainParams | LogisticParams,
    features: FeaturesFile,
    features_source: str | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Manifest:
    """Train `version` with the trainer its settings are for (TrainParams: LightGBM;
    LogisticParams: logistic regression) and register it."""
    check_version_name(version)
    if store.exists(version):
        raise ModelStoreError(
            f"model version {version!r} already exists at {store.path(version)}; "
            "choose a new version (registered versions are immutable)"
        )
    specs = resolve(features.inputs, infos, project)

    progress(f"{version}: building the training matrix ({len(specs)} features)")
    logged = LoggedRows.read(project, views, data_dir, specs)
    dataset = logged_training_set(logged, specs)
    progress(f"{version}: lineage (regions of the people in the log, digests of its tables)")
    lineage = trained_lineage(project, views, data_dir, specs, logged)
    split = int(len(dataset.labels) * (1 - HOLDOUT_FRACTION))
    train_x, hold_x = dataset.matrix[:split], dataset.matrix[split:]
    train_y, hold_y = dataset.labels[:split], dataset.labels[split:]

    names = [s.name for s in specs]
    if isinstance(params, LogisticParams):
        progress(f"{version}: training a logistic regression")
        fitted = fit_logistic(params, train_x, train_y, names)
    else:
        progress(f"{version}: training LightGBM ({params.num_boost_round} rounds)")
        fitted = fit_lightgbm(params, train_x, train_y, names)
    if fitted.coefficients is not None:
        shown = ", ".join(f"{name} {value:+.3f}" for name, value in fitted.coefficients.items())
        progress(f"{version}: coefficients (standardized inputs): {shown}")
    hold_p = fitted.predict(hold_x)
    metrics = Metrics(
        auc=float(roc_auc_score(hold_y, hold_p)) if len(set(hold_y)) == 2 else None,
        log_loss=float(log_loss(hold_y, hold_p, labels=[0, 1])),
    )

    progress(f"{version}: converting to ONNX, item embeddings for retrieval, registering")
    rng = np.random.default_rng(0)
    parity_rows = rng.choice(
        len(dataset.matrix), min(PARITY_ROWS, len(dataset.matrix)), replace=False
    )
    with tempfile.TemporaryDirectory(prefix="rankgate-train-") as scratch:
        onnx_path, native_path = Path(scratch) / "model.onnx", Path(scratch) / fitted.native_file
        onnx.save_model(fitted.onnx, str(onnx_path))
        fitted.save_native(native_path)
        manifest = register(
            store,
            project,
            infos,
            Candidate(
                version=version,
                onnx_path=onnx_path,
                features=features,
                booster=native_path,
                booster_kind=fitted.booster_kind,
                metrics=metrics,
                params=fitted.params,
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
                trained_on=trained_window(logged, split),
                data=lineage,
                reference_rows=lambda _specs: ReferenceRows(dataset.matrix, "training matrix"),
                retrieval=lambda score, specs: item_embeddings(
                    score, specs, logged, dataset, views, data_dir
                ),
            ),
        )
    progress(f"{version}: registered at {store.path(version)}")
    return manifest
