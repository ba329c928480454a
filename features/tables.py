"""The files behind a project's views: its catalogue, its views' offline rows, read
from `AppliedView`s (features/applied.py), so without importing Feast.

Feast reads offline rows through its offline store for `materialize`; training,
registration, evaluation and the catalogue read the same files directly (a
point-in-time join of a whole log is a few array operations, features/offline.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from features.applied import AppliedView
from rankgate.core.errors import ConfigError
from rankgate.core.project import ItemId, Project

if TYPE_CHECKING:
    import pandas as pd


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet or CSV file as a frame; ConfigError names the file."""
    import pandas as pd

    try:
        if path.suffix in {".csv", ".gz"} or path.name.endswith(".csv.gz"):
            return pd.read_csv(path, usecols=columns)
        return pd.read_parquet(path, columns=columns)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def source_path(view: AppliedView, project: Project) -> Path:
    """The file behind a view's batch source (relative paths: from the repository)."""
    if view.source_path is None:
        raise ConfigError(
            f"{project.file}: view {view.name!r} reads a {view.source_type}; rankgate "
            "reads catalogues and training rows from file sources (name a catalogue file)"
        )
    path = Path(view.source_path)
    return path if path.is_absolute() else project.feast_repo / path


def catalogue_path(project: Project, views: Sequence[AppliedView], data_dir: Path) -> Path:
    """The file the catalogue is read from: its view's source, or `catalogue.file`."""
    spec = project.spec.catalogue
    if spec.view is None:
        return project.path(spec.file or "", data_dir)
    view = next((v for v in views if v.name == spec.view), None)
    if view is None:
        raise ConfigError(f"{project.file}: field 'catalogue.view': no feature view {spec.view!r}")
    return source_path(view, project)


def serving_files(
    project: Project, views: Sequence[AppliedView], data_dir: Path
) -> dict[str, Path]:
    """The tables the serving path reads, by role: the catalogue, and the interaction
    log when the project has one (the popularity fallback). What `rankgate publish`
    copies to the artifact store for a cluster's replicas."""
    files = {"catalogue": catalogue_path(project, views, data_dir)}
    if project.spec.interactions is not None:
        files["interactions"] = project.path(project.spec.interactions.path, data_dir)
    return files


def load_catalogue(
    project: Project, views: Sequence[AppliedView], data_dir: Path, path: Path | None = None
) -> list[ItemId]:
    """Every item id of the catalogue, sorted, as the project's type; `path`: the
    catalogue's file when it was fetched (default: `catalogue_path`). ConfigError
    (file and field) when the source is missing, empty or of the wrong type."""
    spec = project.spec.catalogue
    column = spec.column or project.spec.item.join_key
    field = "catalogue.view" if spec.view is not None else "catalogue.file"
    path = path or catalogue_path(project, views, data_dir)
    frame = read_table(path)
    if column not in frame.columns:
        raise ConfigError(f"{project.file}: field {field!r}: {path} has no column {column!r}")
    values = frame[column].dropna().unique().tolist()
    if not values:
        raise ConfigError(
            f"{project.file}: field {field!r}: {path} lists no items (empty catalogue)"
        )
    try:
        ids = sorted({project.item_id(v) for v in values})  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{project.file}: field 'item.id_type': {path} column {column!r} holds values "
            f"that are not {project.spec.item.id_type} ids ({exc})"
        ) from exc
    if project.spec.item.id_type == "int" and any(
        isinstance(v, float) and not v.is_integer() or isinstance(v, str) for v in values
    ):
        raise ConfigError(
            f"{project.file}: field 'item.id_type': {path} column {column!r} holds "
            "non-integer ids; declare id_type: string"
        )
    return ids
