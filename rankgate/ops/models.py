"""Model versions: train, register, give a drift reference, validate, list.

What the `rankgate model ...` commands for versions do, with the home's
environment opened here; the trainers, onnxruntime and Feast are imported when a
version is trained or checked against the interaction log, not for a listing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from features.spec import FeaturesFile, load_features_file
from model_store.artifacts import ArtifactStore
from model_store.manifest import REFERENCE_FILE, RETRIEVAL_FILE, Manifest, Metrics
from model_store.store import ValidationReport
from rankgate.core.config_files import load_yaml_model
from rankgate.core.errors import RankgateError
from rankgate.ops.environment import Environment

if TYPE_CHECKING:
    from model_store.export import Exported
    from model_store.train import LogisticParams, Trainer, TrainParams

Say = Callable[[str], None]

MODEL_TABLE_HEADER = (
    "VERSION",
    "STATE",
    "FEATURES",
    "METRICS (HELD OUT)",
    "CREATED",
    "LINEAGE (TRAINING DATA)",
)


@dataclass(frozen=True)
class DeclaredData:
    """The data lineage `model register` is given (`--data-regions` and its companions)."""

    regions: str | None = None
    cleared_for_transfer: str | None = None
    rows: int | None = None
    files: list[Path] = field(default_factory=list)


def train_model(
    version: str, trainer: Trainer, params: str | None, features_path: Path | None, say: Say
) -> Manifest:
    """Train VERSION on the project's interaction log and register it. Default inputs:
    those of the project's last setup model."""
    from model_store.train import parse_params

    env = Environment.open(redis=False)
    if features_path is None:
        if not env.project.spec.setup_models:
            raise RankgateError("--features: required (the project declares no setup models)", 422)
        features_path = env.project.path(env.project.spec.setup_models[-1].features)
    return train_in(
        env,
        version,
        parse_params(params, trainer),
        load_features_file(features_path),
        str(features_path),
        say,
    )


def train_in(
    env: Environment,
    version: str,
    params: TrainParams | LogisticParams,
    features: FeaturesFile,
    features_source: str | None = None,
    say: Say = lambda _message: None,
) -> Manifest:
    """Train `version` on the interaction log of `env`'s project, with `features` as
    its inputs, and register it in `env`'s model store."""
    from model_store.train import train

    return train(
        env.models,
        env.project,
        env.views(),
        env.view_infos(),
        env.data_dir,
        version,
        params,
        features,
        features_source,
        say,
    )


def trained_summary(version: str, manifest: Manifest) -> str:
    assert manifest.metrics is not None
    auc = "n/a" if manifest.metrics.auc is None else f"{manifest.metrics.auc:.3f}"
    loss = "n/a" if manifest.metrics.log_loss is None else f"{manifest.metrics.log_loss:.4f}"
    return (
        f"{version}: held-out AUC {auc}, log loss {loss}, "
        f"ONNX parity {manifest.onnx.parity_max_abs_diff or 0:.1e}"
    )


@dataclass(frozen=True)
class Registered:
    version: str
    manifest: Manifest
    path: Path
    published_to: str | None

    def lines(self) -> list[str]:
        parity = self.manifest.onnx.parity_max_abs_diff
        reference = (
            "drift reference from the interaction log"
            if REFERENCE_FILE in self.manifest.artifacts
            else "no drift reference: the project has no interaction log"
        )
        retrieval = (
            "item embeddings for retrieval"
            if RETRIEVAL_FILE in self.manifest.artifacts
            else "no item embeddings: the project has no interaction log"
        )
        published = [f"{self.version}: published to {self.published_to}"]
        window = self.manifest.lineage.trained_on
        trained = [
            f"{self.version}: trained on {window}" if window else "",
            f"{self.version}: lineage: {self.manifest.lineage.shown()}"
            if self.manifest.lineage.data is not None
            else f"{self.version}: no lineage recorded (declare its training data with "
            "--data-regions; a region with a residency rule accepts no version without)",
        ]
        return [*(published if self.published_to else [])] + [
            f"{self.version}: registered at {self.path} ({len(self.manifest.features)} inputs; "
            + (
                f"native parity {parity:.1e}, explained by SHAP"
                if parity is not None
                else "no tree model: answers say explainer_unavailable"
            )
            + f"; {reference}; {retrieval})",
            *filter(None, trained),
        ]


def export_features(
    output: Path,
    version: str | None,
    features_path: Path | None,
    logs_path: Path | None,
    say: Say = lambda _message: None,
) -> Exported:
    """Write the interaction log's training matrix (of VERSION's inputs, or a
    FEATURES.yaml's; default: the last setup model's) to a Parquet file."""
    from features.spec import resolve
    from model_store.export import export_matrix
    from model_store.logged import LoggedRows

    if version is not None and features_path is not None:
        raise RankgateError("choose one of --model VERSION and --features FILE", 422)
    env = Environment.open(redis=False)
    if version is not None:
        if not env.models.exists(version):
            raise RankgateError(f"--model: no model version {version!r} in this home", 404)
        specs = env.models.manifest(version).specs
    else:
        if features_path is None:
            if not env.project.spec.setup_models:
                raise RankgateError(
                    "--features: required (the project declares no setup models)", 422
                )
            features_path = env.project.path(env.project.spec.setup_models[-1].features)
        infos = env.view_infos()
        if not infos:
            raise RankgateError("no Feast registry in this home: run `rankgate setup` first", 409)
        specs = resolve(load_features_file(features_path).inputs, infos, env.project)
    say(f"reading the interaction log ({len(specs)} inputs)")
    logged = LoggedRows.read(env.project, env.views(), env.data_dir, specs, logs_path)
    total = len(logged.logs)
    return export_matrix(
        logged, specs, output, progress=lambda rows: say(f"  {rows:,} of {total:,} rows written")
    )


def register_model(
    version: str,
    onnx_path: Path,
    features_path: Path,
    booster: Path | None,
    metrics_path: Path | None,
    item_embeddings: Path | None = None,
    trained_on: str | None = None,
    declared: DeclaredData | None = None,
) -> Registered:
    """Register a ranker trained anywhere as VERSION, checked against the Feast registry;
    published to the artifact store too when RANKGATE_STORE is set. Its retrieval
    artifact: `item_embeddings` (a table of item vectors), or distilled from it;
    `trained_on`: FROM..TO, the times of the rows it learned from; `declared`: the
    regions, rows and tables of its training data."""
    from model_store.lineage import declared_lineage, parse_window
    from model_store.logged import ProjectLog
    from model_store.register import Candidate, register

    window = parse_window(trained_on) if trained_on is not None else None
    data = declared or DeclaredData()
    lineage = declared_lineage(data.regions, data.cleared_for_transfer, data.rows, data.files)
    env = Environment.open(redis=False)
    infos = env.view_infos()
    if not infos:
        raise RankgateError("no Feast registry in this home: run `rankgate setup` first", 409)
    log = ProjectLog(env.project, env.views(), env.data_dir)
    manifest = register(
        env.models,
        env.project,
        infos,
        Candidate(
            version=version,
            onnx_path=onnx_path,
            features=load_features_file(features_path),
            booster=booster,
            metrics=load_yaml_model(metrics_path, Metrics) if metrics_path else None,
            features_source=str(features_path.resolve()),
            trained_on=window,
            data=lineage,
            reference_rows=log.reference,
            retrieval=lambda score, specs: log.retrieval(score, specs, item_embeddings),
        ),
    )
    if env.settings.store is not None:
        ArtifactStore(env.settings.store).publish_version(env.models, version)
    return Registered(version, manifest, env.models.path(version), env.settings.store)


def add_drift_reference(version: str) -> str:
    """Give VERSION its drift reference from the project's interaction log; says where."""
    from model_store.logged import ProjectLog
    from model_store.register import add_reference

    env = Environment.open(redis=False)
    specs = env.models.manifest(version).specs
    rows = ProjectLog(env.project, env.views(), env.data_dir).reference(specs)
    if rows is None:
        raise RankgateError(
            f"{env.project.file}: no interaction log with a user column: there is nothing "
            "to build a drift reference from",
            422,
        )
    path = add_reference(env.models, version, rows)
    return f"{version}: drift reference of {len(rows.matrix)} logged rows at {path}"


def add_lineage(version: str) -> str:
    """Give VERSION, trained here before lineage existed, its data lineage from the
    project's interaction log (when it is the log it was trained on); says what it is."""
    from model_store.lineage import record_lineage

    env = Environment.open(redis=False)
    if not env.models.exists(version):
        raise RankgateError(f"no model version {version!r} in this home", 404)
    data = record_lineage(env.models, env.project, env.views(), env.data_dir, version)
    if env.settings.store is not None:
        ArtifactStore(env.settings.store).publish_version(env.models, version)
    return f"{version}: lineage: {data.shown()}"


def add_item_embeddings(version: str, item_embeddings: Path | None = None) -> str:
    """Give VERSION its retrieval artifact: distilled from its ranker on the project's
    interaction log (or `item_embeddings`, a table of item vectors); says where."""
    from model_store.logged import ProjectLog
    from model_store.register import add_retrieval

    env = Environment.open(redis=False)
    if not env.models.exists(version):
        raise RankgateError(f"no model version {version!r} in this home", 404)
    log = ProjectLog(env.project, env.views(), env.data_dir)
    path = add_retrieval(
        env.models, version, lambda score, specs: log.retrieval(score, specs, item_embeddings)
    )
    if env.settings.store is not None:
        ArtifactStore(env.settings.store).publish_version(env.models, version)
    return f"{version}: item embeddings for retrieval at {path}"


def validate_model(version: str) -> ValidationReport:
    """Recheck hashes, ONNX/native parity and features of VERSION."""
    env = Environment.open()
    return env.models.validate(version, env.view_infos())


def list_models() -> list[tuple[str, str, str, str, str, str]]:
    """The registered versions and their state."""
    return Environment.open(redis=False).model_rows()
