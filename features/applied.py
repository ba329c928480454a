"""The views of a home's applied Feast registry as plain data, recorded beside it.

Importing Feast costs seconds (its package imports every offline store), and
commands that only need to know which views and fields exist (`model promote`
checks a version's inputs against them) should not pay for it. When the registry
is applied, and whenever Feast has been read anyway, each view's name, entities
and fields are written to `<home>/feast/views.json` with the registry file's
sha256; a reader trusts the record only while the digest still matches (Feast's
own `feast apply` changes it). With an artifact store (RANKGATE_STORE), Feast reads
the store's registry, not the home's, and no record is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from features.spec import ViewInfo
from rankgate.core.project import Project

if TYPE_CHECKING:
    from feast import FeatureView

RECORD_FILE = "views.json"


@dataclass(frozen=True)
class AppliedView:
    name: str
    entities: tuple[str, ...]
    fields: tuple[str, ...]


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


def of_feast(views: Iterable[FeatureView]) -> list[AppliedView]:
    return [
        AppliedView(v.name, tuple(v.entities), tuple(f.name for f in v.features)) for v in views
    ]


def read_record(registry: Path) -> list[AppliedView] | None:
    """The recorded views of `registry`, or None when there is no record of this very
    registry file (then Feast must be read)."""
    path = registry.with_name(RECORD_FILE)
    try:
        record = json.loads(path.read_text())
        if record["registry_sha256"] != registry_digest(registry):
            return None
        return [
            AppliedView(v["name"], tuple(v["entities"]), tuple(v["fields"]))
            for v in record["views"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(registry: Path, digest: str, views: Iterable[AppliedView]) -> None:
    """Record `views` as those of the registry whose sha256 was `digest` when they were
    read (taken before reading, so a registry changed meanwhile is read again)."""
    path = registry.with_name(RECORD_FILE)
    record = {
        "registry_sha256": digest,
        "views": [
            {"name": v.name, "entities": list(v.entities), "fields": list(v.fields)} for v in views
        ],
    }
    staging = path.with_name(f".{RECORD_FILE}.{os.getpid()}")
    staging.write_text(json.dumps(record, indent=1) + "\n")
    staging.replace(path)
