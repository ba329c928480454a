"""The views of a home's applied Feast registry as plain data, recorded beside it.

Importing Feast costs seconds (its package imports every offline store), and
commands that only need to know which views and fields exist (`model promote`
checks a version's inputs against them) or read a view's offline file (`model
register` builds the drift reference and the item embeddings from the interaction
log) should not pay for it. When the registry is applied, and whenever Feast has
been read anyway, each view is written as an `AppliedView` to
`<home>/feast/views.json` with the registry file's sha256; a reader trusts the
record only while the digest still matches (Feast's own `feast apply` changes it).
With an artifact store (RANKGATE_STORE), Feast reads the store's registry, not the
home's, and no record is kept.

The offline readers (features/tables.py, model_store/logged.py) take `AppliedView`s
only: a Feast view is described (`describe`) before it is read, so a recorded view
and one Feast gives are read by the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from features.spec import ViewInfo
from rankgate.core.project import Project

if TYPE_CHECKING:
    from feast import FeatureView

RECORD_FILE = "views.json"


@dataclass(frozen=True)
class AppliedView:
    """A Feast feature view as plain data: what rankgate reads of it without Feast."""

    name: str
    entities: tuple[str, ...]
    fields: tuple[str, ...]
    source_type: str
    """The class of its batch source (FileSource, ...): named when it is not a file."""
    source_path: str | None
    """A file source's path as the view declares it (relative: to the repository);
    None: not a file source."""
    timestamp_field: str | None
    """The batch source's event time column (None: none)."""
    ttl_s: float | None
    """How long a row stays valid online, in seconds (None: for ever)."""


def registry_digest(registry: Path) -> str:
    return hashlib.sha256(registry.read_bytes()).hexdigest()


def infos(views: Iterable[AppliedView], project: Project) -> dict[str, ViewInfo]:
    """Each view's entity (user, item or other) and fields, as the builder needs them."""
    result = {}
    for view in views:
        entity: Literal["user", "item", "other"] = (
            "user"
            if project.spec.user.entity in view.entities
            else "item"
            if project.spec.item.entity in view.entities
            else "other"
        )
        result[view.name] = ViewInfo(view.name, entity, view.fields)
    return result


def describe(view: FeatureView) -> AppliedView:
    from feast import FileSource

    source = view.batch_source
    return AppliedView(
        name=view.name,
        entities=tuple(view.entities),
        fields=tuple(f.name for f in view.features),
        source_type=type(source).__name__,
        source_path=source.path if isinstance(source, FileSource) else None,
        timestamp_field=(source.timestamp_field or None) if source is not None else None,
        ttl_s=view.ttl.total_seconds() if view.ttl else None,
    )


def of_feast(views: Iterable[FeatureView]) -> list[AppliedView]:
    return [describe(v) for v in views]


def read_record(registry: Path) -> list[AppliedView] | None:
    """The recorded views of `registry`, or None when there is no record of this very
    registry file (then Feast must be read)."""
    path = registry.with_name(RECORD_FILE)
    try:
        record = json.loads(path.read_text())
        if record["registry_sha256"] != registry_digest(registry):
            return None
        return [
            AppliedView(
                name=v["name"],
                entities=tuple(v["entities"]),
                fields=tuple(v["fields"]),
                source_type=v["source_type"],
                source_path=v["source_path"],
                timestamp_field=v["timestamp_field"],
                ttl_s=v["ttl_s"],
            )
            for v in record["views"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, or one an older rankgate wrote: Feast is read again


def write_record(registry: Path, digest: str, views: Iterable[AppliedView]) -> None:
    """Record `views` as those of the registry whose sha256 was `digest` when they were
    read (taken before reading, so a registry changed meanwhile is read again)."""
    path = registry.with_name(RECORD_FILE)
    record = {
        "registry_sha256": digest,
        "views": [asdict(v) for v in views],
    }
    staging = path.with_name(f".{RECORD_FILE}.{os.getpid()}")
    staging.write_text(json.dumps(record, indent=1) + "\n")
    staging.replace(path)
