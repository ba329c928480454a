"""Train a click model on a project's interaction logs (LightGBM, or scikit-learn's
LogisticRegression on standardized inputs), convert it to ONNX, and register it
through the same path as a model trained anywhere else (model_store.register).

The training matrix is built by features.vector.build_matrix, the function the
online ranker calls, from the offline sources of the project's feature views
(the latest row per entity: the snapshot the online store serves). A streaming
view has no offline snapshot: its value at each logged impression is computed
from the log itself, point in time (features.history).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import onnx
import pandas as pd
import yaml
from feast import FeatureView
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.metrics import log_loss, roc_auc_score

from features.history import field_names, ttl_seconds, view_values
from features.offline import LogMatrix, UserRows, item_rows
from features.spec import FeaturesFile, FeatureSpec, ViewInfo, resolve
from features.store import load_catalogue, read_table, source_path
from features.vector import ItemTable
from model_store.embeddings import ItemEmbeddings, Score, build_artifact, read_vectors
from model_store.manifest import Manifest, Metrics, TrainingData
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


def user_rows(view: FeatureView, project: Project) -> UserRows:
    """A user view's offline rows, every row kept: a log joins them as of each impression."""
    key = project.spec.user.join_key
    frame = read_table(source_path(view, project))
    stamp = view.batch_source.timestamp_field if view.batch_source else None
    return UserRows.of(frame[frame[key].notna()], key, stamp)


def item_ids_of(project: Project, values: pd.Series) -> np.ndarray:
    """A log column of item ids as the project's type (int64, or str objects)."""
    if project.spec.item.id_type == "int":
        return values.to_numpy(dtype=np.int64)
    return values.astype(str).to_numpy(dtype=object)


def log_tables(
    project: Project, views: Sequence[FeatureView], specs: Sequence[FeatureSpec]
) -> tuple[dict[str, UserRows], ItemTable, dict[str, FeatureView]]:
    """What a log's rows are joined with: the user views the specs read (every offline
    row), the item table, and the streaming views the specs read (by name)."""
    by_name = {v.name: v for v in views}
    user_views = {s.view for s in specs if s.source == "user" and s.view}
    users = {
        name: user_rows(by_name[name], project)
        for name in sorted(user_views - set(project.streaming))
    }
    streaming = {name: by_name[name] for name in sorted(user_views & set(project.streaming))}
    return users, load_item_table(project, views), streaming


CHUNK_ROWS = 1_000_000
"""Log rows built per step: what one step holds besides the matrix is bounded by it."""


@dataclass
class LoggedRows:
    """A log's rows and what a model would have read at each: the user views' offline
    rows as of the row's time, the streaming views' values at the row's time, the row's
    context (features/offline.py). Training, export, drift references and off-policy
    evaluation read logs through this one class."""

    project: Project
    logs: pd.DataFrame
    """The log sorted by time (when it has a time column), rows of unknown items dropped."""
    item_ids: np.ndarray
    """The rows' item ids, as the project's type."""
    users: dict[str, UserRows]
    items: ItemTable
    contexts: list[str]
    streaming: dict[str, FeatureView]
    """The streaming views the specs read, by name."""

    @classmethod
    def read(
        cls,
        project: Project,
        views: Sequence[FeatureView],
        data_dir: Path,
        specs: Sequence[FeatureSpec],
        path: Path | None = None,
        required: Sequence[str] = (),
    ) -> LoggedRows:
        """The project's interaction log (or `path`, with the same columns); ModelStoreError
        names the field when a needed column (the `required` fields of `interactions`
        among them) is not declared or not in the log."""
        spec = project.spec.interactions
        if spec is None or spec.user_column is None:
            raise ModelStoreError(
                f"{project.file}: field 'interactions': this needs a log with a user column; "
                "train elsewhere and use `rankgate model register`",
                422,
            )
        for name in required:
            if getattr(spec, name) is None:
                raise ModelStoreError(
                    f"{project.file}: field 'interactions.{name}': not declared", 422
                )
        logs = read_table(path or project.path(spec.path, data_dir))
        wanted = [spec.user_column, spec.item_column, spec.outcome_column]
        wanted += [getattr(spec, name) for name in required]
        missing = [c for c in wanted if c not in logs]
        if missing:
            raise ModelStoreError(
                f"{project.file}: field 'interactions': the log has no column {missing[0]!r}", 422
            )
        if spec.time_column and spec.time_column in logs:
            logs = logs.sort_values(spec.time_column, kind="stable")
        logs = logs.reset_index(drop=True)
        users, items, streaming = log_tables(project, views, specs)
        item_ids = item_ids_of(project, logs[spec.item_column])
        if len(items) and any(s.source == "item" for s in specs):
            known = item_rows(items, item_ids) >= 0
            if not known.all():
                logs, item_ids = logs[known].reset_index(drop=True), item_ids[known]
        contexts = [c for c in project.context if c in logs.columns]
        if streaming and not (spec.time_column and spec.time_column in logs):
            raise ModelStoreError(
                f"{project.file}: field 'interactions.time_column': a model that reads the "
                f"streaming view {next(iter(streaming))!r} is trained on its value at each "
                "impression's time, so the log needs a time column",
                422,
            )
        return cls(project, logs, item_ids, users, items, contexts, streaming)

    @property
    def user_column(self) -> str:
        spec = self.project.spec.interactions
        assert spec is not None and spec.user_column is not None
        return spec.user_column

    @cached_property
    def times(self) -> np.ndarray | None:
        """The rows' times (int64 ns, UTC); None: the log has no time column."""
        spec = self.project.spec.interactions
        assert spec is not None
        if not spec.time_column or spec.time_column not in self.logs:
            return None
        stamps = pd.to_datetime(self.logs[spec.time_column], utc=True)
        return stamps.to_numpy("datetime64[ns]").astype(np.int64)

    def streamed(
        self, spec: FeatureSpec, query_rows: np.ndarray, query_items: np.ndarray
    ) -> np.ndarray:
        """A streaming input's value for log rows `query_rows`, scoring `query_items`
        (the view's value just before the row's time; features/history.py)."""
        project = self.project
        view = project.streaming[spec.view or ""]
        if view.per == "item":
            if spec.per_item:
                counted: np.ndarray | None = query_items
            else:  # one item's field, named outright
                of = field_names(view, self.items.item_ids or list(dict.fromkeys(self.item_ids)))
                counted = np.full(len(query_rows), of.get(spec.field), dtype=object)
        else:
            counted = None
        ttl = ttl_seconds(self.streaming[view.view])
        return view_values(
            project, view, ttl, self.logs, self.item_ids, query_rows, counted
        ).astype(np.float32)

    def batches(
        self, specs: Sequence[FeatureSpec], chunk_rows: int = CHUNK_ROWS
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Each row's model input as serving would have built it then (float32,
        rows x specs), `chunk_rows` rows at a time: (the rows, their matrix)."""
        builder = LogMatrix(specs, self.users, self.items)
        n = len(self.logs)
        every = np.arange(n)
        streamed = {
            col: self.streamed(spec, every, self.item_ids)
            for col, spec in enumerate(specs)
            if spec.view in self.streaming
        }
        times = self.times
        keys = self.logs[self.user_column].to_numpy()
        contexts = {c: self.logs[c].to_numpy() for c in self.contexts}
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            yield (
                rows,
                builder.rows(
                    keys[rows],
                    self.item_ids[rows],
                    None if times is None else times[rows],
                    {c: values[rows] for c, values in contexts.items()},
                    {col: values[rows] for col, values in streamed.items()},
                ),
            )

    def matrix(self, specs: Sequence[FeatureSpec]) -> np.ndarray:
        """Every row's model input (float32, rows x specs)."""
        matrix = np.empty((len(self.logs), len(specs)), dtype=np.float32)
        for rows, part in self.batches(specs):
            matrix[rows] = part
        return matrix


def log_rows(
    project: Project, views: Sequence[FeatureView], data_dir: Path, specs: Sequence[FeatureSpec]
) -> ReferenceRows | None:
    """The project's interaction log as rows of `specs` (a registered version's drift
    reference); None when the project has no log with a user column."""
    spec = project.spec.interactions
    if spec is None or spec.user_column is None:
        return None
    return ReferenceRows(
        training_set(project, views, data_dir, specs).matrix, "project interaction log"
    )


def training_set(
    project: Project,
    views: Sequence[FeatureView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
) -> TrainingSet:
    logged = LoggedRows.read(project, views, data_dir, specs)
    return logged_training_set(logged, specs)


def logged_training_set(logged: LoggedRows, specs: Sequence[FeatureSpec]) -> TrainingSet:
    spec = logged.project.spec.interactions
    assert spec is not None
    logs = logged.logs
    return TrainingSet(
        matrix=logged.matrix(specs),
        labels=logs[spec.outcome_column].to_numpy(dtype=np.int8),
        timestamps=logged.times if logged.times is not None else np.arange(len(logs)),
    )


def item_embeddings(
    score: Score,
    specs: Sequence[FeatureSpec],
    logged: LoggedRows,
    dataset: TrainingSet,
    views: Sequence[FeatureView],
    data_dir: Path,
    vectors_file: Path | None = None,
) -> ItemEmbeddings:
    """A version's retrieval artifact over the catalogue: item embeddings distilled from
    its ranker (or read from `vectors_file`), popularity from the log
    (model_store/embeddings.py)."""
    project = logged.project
    catalogue = load_catalogue(project, list(views), data_dir)
    vectors = None
    if vectors_file is not None:
        found = read_vectors(vectors_file, project.spec.item.join_key, catalogue, project.item_id)
        vectors = (found, vectors_file.name)
    return build_artifact(
        score,
        specs,
        dataset.matrix,
        logged.items,
        catalogue,
        log=(dataset.labels, logged.item_ids),
        vectors=vectors,
    )


class ProjectLog:
    """The project's interaction log as rows of a version's inputs, read at most once
    (a registered version's drift reference and retrieval artifact both need it)."""

    def __init__(self, project: Project, views: Sequence[FeatureView], data_dir: Path) -> None:
        self.project, self.views, self.data_dir = project, list(views), data_dir
        self._read: tuple[LoggedRows, TrainingSet] | None = None

    @property
    def exists(self) -> bool:
        spec = self.project.spec.interactions
        return spec is not None and spec.user_column is not None

    def rows(self, specs: Sequence[FeatureSpec]) -> tuple[LoggedRows, TrainingSet] | None:
        if not self.exists:
            return None
        if self._read is None:
            logged = LoggedRows.read(self.project, self.views, self.data_dir, specs)
            self._read = (logged, logged_training_set(logged, specs))
        return self._read

    def reference(self, specs: Sequence[FeatureSpec]) -> ReferenceRows | None:
        read = self.rows(specs)
        return None if read is None else ReferenceRows(read[1].matrix, "project interaction log")

    def retrieval(
        self, score: Score, specs: Sequence[FeatureSpec], vectors_file: Path | None
    ) -> ItemEmbeddings | None:
        """The artifact (None without a log: the prototypes are logged people)."""
        read = self.rows(specs)
        if read is None:
            if vectors_file is not None:
                raise ModelStoreError(
                    f"--item-embeddings: {self.project.file}: field 'interactions': retrieval "
                    "fits a person's vector on logged people; the project has no log",
                    422,
                )
            return None
        return item_embeddings(score, specs, *read, self.views, self.data_dir, vectors_file)


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


def train(
    store: ModelStore,
    project: Project,
    views: Sequence[FeatureView],
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
                reference_rows=lambda _specs: ReferenceRows(dataset.matrix, "training matrix"),
                retrieval=lambda score, specs: item_embeddings(
                    score, specs, logged, dataset, views, data_dir
                ),
            ),
        )
    progress(f"{version}: registered at {store.path(version)}")
    return manifest
