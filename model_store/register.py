"""Register a ranker, wherever it was trained: `rankgate model register` and `model train`.

A version is an ONNX file whose single input is a float32 matrix, one column per
declared input (FEATURES.yaml: Feast references `view:field`, item attributes,
context features, in ONNX column order). Registration checks, before anything is
written:
  - the version name is new (registered versions are immutable);
  - every reference exists in the project's Feast registry (features.vector.resolve);
  - the ONNX input is a float tensor exactly as wide as the declaration, and its
    output is a probability or score tensor (not a ZipMap);
  - a score of sample rows runs and gives one finite number per row;
  - with a native tree model (`--booster`), ONNX and native agree to 1e-5.
It then writes the version folder (ONNX with its version and inputs in
`metadata_props`, the booster, the parity rows, the drift reference when there
are reference rows, manifest.json with hashes, inputs and lineage) into a staging
folder and renames it into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import onnx

from features.spec import FeaturesFile, FeatureSpec, ViewInfo, resolve
from model_store.embeddings import RETRIEVAL_FILE, ItemEmbeddings, Score
from model_store.manifest import (
    BOOSTER_FILES,
    MANIFEST_FILE,
    MAX_PARITY_DIFF,
    ONNX_FILE,
    PARITY_INPUTS_FILE,
    REFERENCE_FILE,
    Booster,
    BoosterKind,
    DataLineage,
    Lineage,
    Manifest,
    ManifestFeature,
    Metrics,
    OnnxInfo,
    TrainingData,
    TrainingWindow,
)
from model_store.native import load_native, predict_native
from model_store.onnx_scoring import OnnxScorer
from model_store.reference import compute_reference, native_explain
from model_store.store import ModelStore, check_version_name, sha256_file, write_json
from rankgate.core.errors import ModelStoreError, VersionExists
from rankgate.core.project import Project

SAMPLE_ROWS = 256
LIBRARIES = ("onnx", "onnxruntime", "lightgbm", "xgboost", "scikit-learn", "shap")


@dataclass
class Candidate:
    """What is being registered, before any check."""

    version: str
    onnx_path: Path
    features: FeaturesFile
    booster: Path | None = None
    booster_kind: BoosterKind | None = None
    metrics: Metrics | None = None
    params: Mapping[str, float | int | str | bool] | None = None
    training_data: TrainingData | None = None
    sample_rows: np.ndarray | None = None
    """Rows to score and compare (training rows); default: synthetic rows."""
    made_by: str = "rankgate model register"
    features_source: str | None = None
    trained_on: TrainingWindow | None = None
    """The times of the rows it learned from (None: not declared)."""
    data: DataLineage | None = None
    """The regions, rows and input tables of its training data (None: not recorded)."""
    reference_rows: Callable[[Sequence[FeatureSpec]], ReferenceRows | None] | None = None
    """The rows the drift reference describes, given the resolved inputs (None, or a
    None result: the version gets no reference)."""
    retrieval: Callable[[Score, Sequence[FeatureSpec]], ItemEmbeddings | None] | None = None
    """The version's retrieval artifact, given its ranker and resolved inputs (None, or a
    None result: the version has no item index)."""


@dataclass(frozen=True)
class ReferenceRows:
    matrix: np.ndarray
    source: str
    """What the rows are, as the reference names them."""


def booster_kind_of(path: Path) -> BoosterKind:
    """The kind of a native model file, from its name."""
    name = path.name.lower()
    if name.endswith((".joblib", ".pkl", ".pickle")):
        return "sklearn"
    if name.endswith((".json", ".ubj")) or "xgb" in name:
        return "xgboost"
    return "lightgbm"


def check_onnx(model: onnx.ModelProto, width: int) -> tuple[str, str, int]:
    """(input name, output name, opset) of a model that fits the declaration;
    ModelStoreError (422) says what does not."""
    inputs = [
        i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    if len(inputs) != 1:
        raise ModelStoreError(
            f"--onnx: the model has {len(inputs)} inputs; rankgate feeds one float matrix", 422
        )
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ModelStoreError(f"--onnx: input {inputs[0].name!r} is {kind}, not FLOAT", 422)
    dims = tensor.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ModelStoreError(
            f"--onnx: input {inputs[0].name!r} must be a (rows, features) matrix with a fixed "
            "number of columns",
            422,
        )
    if dims[1].dim_value != width:
        raise ModelStoreError(
            f"--onnx: input {inputs[0].name!r} is {dims[1].dim_value} columns wide, but "
            f"--features declares {width} inputs",
            422,
        )
    tensors = [o for o in model.graph.output if o.type.HasField("tensor_type")]
    if not tensors:
        raise ModelStoreError(
            "--onnx: no tensor output (a ZipMap output? convert with zipmap=False)", 422
        )
    names = [o.name for o in tensors]
    output = "probabilities" if "probabilities" in names else names[-1]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return inputs[0].name, output, opset


def synthetic_rows(specs: list[FeatureSpec], rows: int = SAMPLE_ROWS) -> np.ndarray:
    """Rows to score when no training rows are given: missing values and spread-out
    numbers, deterministic."""
    rng = np.random.default_rng(0)
    matrix = rng.normal(0.0, 2.0, size=(rows, len(specs))).astype(np.float32)
    for col, spec in enumerate(specs):
        if spec.encoding == "hash":
            matrix[:, col] = rng.integers(0, 1 << 20, size=rows).astype(np.float32)
    matrix[: rows // 8] = -1.0  # everything missing
    return matrix


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = package_version(name)
        except PackageNotFoundError:
            continue
    return found


def write_reference(
    rows: ReferenceRows,
    specs: Sequence[FeatureSpec],
    folder: Path,
    output_name: str,
    booster: Booster | None,
) -> Path:
    """The drift reference of the version in `folder`: its inputs, its ONNX scores (as
    served) and, with a native model, its explanations on the reference rows."""
    scores = OnnxScorer(folder / ONNX_FILE, output_name).score(rows.matrix)
    explain = native_explain(folder / booster.file, booster.kind) if booster else None
    return compute_reference(specs, rows.matrix, scores, rows.source, explain).write(folder)


def register(
    store: ModelStore, project: Project, views: Mapping[str, ViewInfo], candidate: Candidate
) -> Manifest:
    """Check `candidate` and write it as a new version; nothing is written on failure."""
    version = check_version_name(candidate.version)
    if store.exists(version):
        raise VersionExists(
            f"model version {version!r} already exists at {store.path(version)}; "
            "choose a new version (registered versions are immutable)"
        )
    specs = resolve(candidate.features.inputs, views, project)
    try:
        model = onnx.load(str(candidate.onnx_path))
    except FileNotFoundError as exc:
        raise ModelStoreError(f"--onnx: {candidate.onnx_path} not found", 422) from exc
    except Exception as exc:
        raise ModelStoreError(
            f"--onnx: {candidate.onnx_path} is not an ONNX model ({exc})", 422
        ) from exc
    input_name, output_name, opset = check_onnx(model, len(specs))

    rows = candidate.sample_rows if candidate.sample_rows is not None else synthetic_rows(specs)
    staging = store.staging_dir()
    try:
        meta = {p.key: p.value for p in model.metadata_props}
        meta.update(
            {
                "rankgate.version": version,
                "rankgate.project": project.name,
                "rankgate.features": json.dumps(
                    [ManifestFeature.of(s).model_dump() for s in specs]
                ),
            }
        )
        del model.metadata_props[:]
        for key, value in sorted(meta.items()):
            model.metadata_props.add(key=key, value=value)
        onnx.save_model(model, str(staging / ONNX_FILE))
        try:
            scores = OnnxScorer(staging / ONNX_FILE, output_name).score(rows)
        except Exception as exc:
            raise ModelStoreError(f"--onnx: scoring sample rows failed: {exc}", 422) from exc
        if scores.shape != (len(rows),) or not np.all(np.isfinite(scores)):
            raise ModelStoreError(
                f"--onnx: sample rows scored to shape {scores.shape} with non-finite values; "
                "expected one finite score per row",
                422,
            )
        np.save(staging / PARITY_INPUTS_FILE, rows, allow_pickle=False)

        booster, parity = None, None
        if candidate.booster is not None:
            kind = candidate.booster_kind or booster_kind_of(candidate.booster)
            native = load_native(candidate.booster, kind)
            parity = float(np.max(np.abs(predict_native(native, kind, rows) - scores)))
            if parity > MAX_PARITY_DIFF:
                raise ModelStoreError(
                    f"--booster: the ONNX model and {candidate.booster.name} disagree by up to "
                    f"{parity:.2e} on {len(rows)} sample rows (limit {MAX_PARITY_DIFF:.0e}): "
                    "not the same model",
                    422,
                )
            booster = Booster(kind=kind, file=BOOSTER_FILES[kind])
            shutil.copyfile(candidate.booster, staging / booster.file)
        embeddings = (
            candidate.retrieval(OnnxScorer(staging / ONNX_FILE, output_name).score, specs)
            if candidate.retrieval
            else None
        )
        if embeddings is not None:
            embeddings.save(staging)
        reference = candidate.reference_rows(specs) if candidate.reference_rows else None
        if reference is not None:
            write_reference(reference, specs, staging, output_name, booster)

        manifest = Manifest(
            name=store.name,
            version=version,
            created_at=datetime.now(UTC),
            params=dict(candidate.params or {}),
            features=[ManifestFeature.of(s) for s in specs],
            artifacts={
                p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST_FILE
            },
            training_data=candidate.training_data,
            metrics=candidate.metrics,
            onnx=OnnxInfo(
                input_name=input_name,
                output_name=output_name,
                opset=opset,
                parity_max_abs_diff=parity,
            ),
            booster=booster,
            lineage=Lineage(
                made_by=candidate.made_by,  # type: ignore[arg-type]
                project=project.name,
                onnx_source=None
                if candidate.made_by == "rankgate model train"
                else str(candidate.onnx_path.resolve()),
                features_source=candidate.features_source,
                trained_on=candidate.trained_on,
                data=candidate.data,
            ),
            libraries=library_versions(),
        )
        write_json(staging / MANIFEST_FILE, manifest.model_dump(mode="json"))
        store.register(version, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def add_retrieval(
    store: ModelStore,
    version: str,
    build: Callable[[Score, Sequence[FeatureSpec]], ItemEmbeddings | None],
) -> Path:
    """Give a version registered before retrieval existed its retrieval artifact (from
    `build`, given its ranker and inputs), listed with its hash in the manifest.
    Nothing the version scores with changes; a version that has one keeps it."""

    def write(manifest: Manifest, folder: Path) -> Path:
        scorer = OnnxScorer(folder / ONNX_FILE, manifest.onnx.output_name)
        embeddings = build(scorer.score, manifest.specs)
        if embeddings is None:
            raise ModelStoreError(
                f"model version {version!r}: no interaction log to fit item embeddings on", 422
            )
        return embeddings.save(folder)

    return add_artifact(store, version, RETRIEVAL_FILE, "item embeddings", write)


def add_reference(store: ModelStore, version: str, rows: ReferenceRows) -> Path:
    """Give a version registered before drift references existed its reference (from
    `rows`), listed with its hash in the manifest. Nothing the version scores with
    changes; a version that has one keeps it."""

    def write(manifest: Manifest, folder: Path) -> Path:
        return write_reference(
            rows, manifest.specs, folder, manifest.onnx.output_name, manifest.booster
        )

    return add_artifact(store, version, REFERENCE_FILE, "a drift reference", write)


def add_artifact(
    store: ModelStore,
    version: str,
    name: str,
    what: str,
    write: Callable[[Manifest, Path], Path],
) -> Path:
    """Write the artifact `name` into an intact version that lacks it (`write` makes it
    in the version's folder) and list it with its hash in the manifest."""
    manifest = store.manifest(version)
    folder = store.path(version)
    if name in manifest.artifacts:
        raise ModelStoreError(f"model version {version!r} already has {what}", 409)
    report = store.check_hashes(version)
    if not report.ok:
        raise ModelStoreError(f"model version {version!r}: " + "; ".join(report.failures()))
    path = write(manifest, folder)
    manifest.artifacts[name] = sha256_file(path)
    tmp = folder / (MANIFEST_FILE + ".tmp")
    write_json(tmp, manifest.model_dump(mode="json"))
    tmp.replace(folder / MANIFEST_FILE)
    return path
