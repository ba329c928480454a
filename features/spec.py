"""What a model declares about its inputs (FEATURES.yaml), and how each input is
resolved against a project's Feast views. Plain types, no numpy: reading a
manifest does not pay for the numeric stack (features.vector builds the rows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rankgate.core.config_files import Strict, load_yaml_model
from rankgate.core.errors import FeatureRepoError
from rankgate.core.project import ItemId, Project

ITEM_PLACEHOLDER = "{item_id}"
Encoding = Literal["number", "hash"]
Source = Literal["user", "item", "context"]


class ModelInput(Strict):
    """One input column of a model, in ONNX input order."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
    """The column's name (shown in explanations)."""
    feature: str | None = None
    """A Feast feature reference `view:field` (a user view or the item view); the
    field may contain `{item_id}`: the candidate item's own field of a user view."""
    context: str | None = None
    """Or a request-context feature the project declares (rankgate.yaml `context`)."""
    encoding: Encoding = "number"
    """`number` (the value) or `hash` (a stable code of a categorical value's text)."""
    group: str | None = None
    """Key of the plain-language reason template (policies/reasons.yaml); default:
    the view's name, or `context`."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelInput:
        if (self.feature is None) == (self.context is None):
            raise ValueError("name exactly one of `feature` or `context`")
        if self.feature is not None and not re.fullmatch(r"[^:\s]+:[^:\s]+", self.feature):
            raise ValueError(f"feature {self.feature!r}: write it as view:field")
        return self


class FeaturesFile(Strict):
    """A model's FEATURES.yaml: its inputs in ONNX input order."""

    inputs: list[ModelInput] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> FeaturesFile:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("inputs: each name once")
        return self


def load_features_file(path: Path) -> FeaturesFile:
    return load_yaml_model(path, FeaturesFile)


@dataclass(frozen=True)
class FeatureSpec:
    """One resolved model input: where its value is read and how it is encoded."""

    name: str
    source: Source
    view: str | None
    """Feast view (None for a context feature)."""
    field: str
    """Field of the view (may contain {item_id}), or the context key."""
    encoding: Encoding
    group: str

    @property
    def per_item(self) -> bool:
        return self.source == "user" and ITEM_PLACEHOLDER in self.field

    def field_for(self, item_id: ItemId) -> str:
        return item_field(self.field, item_id)


@lru_cache(maxsize=65536)
def item_field(template: str, item_id: ItemId) -> str:
    """The field a per-item template names for one item (cached: the request path asks
    for every candidate of every request)."""
    return template.replace(ITEM_PLACEHOLDER, str(item_id))


@dataclass(frozen=True)
class ViewInfo:
    """What the builder needs to know of a Feast view of the project."""

    name: str
    entity: Literal["user", "item", "other"]
    fields: tuple[str, ...]


def template_fields(template: str, fields: Sequence[str]) -> list[str]:
    """The fields of a view a per-item template can name."""
    pattern = re.compile(re.escape(template).replace(re.escape(ITEM_PLACEHOLDER), ".+"))
    return [f for f in fields if pattern.fullmatch(f)]


def resolve(
    inputs: Sequence[ModelInput], views: Mapping[str, ViewInfo], project: Project
) -> list[FeatureSpec]:
    """Inputs checked against the project's views and context; FeatureRepoError names
    every reference the repository lacks."""
    specs, problems = [], []
    for n, item in enumerate(inputs):
        where = f"inputs.{n} ({item.name})"
        if item.context is not None:
            declared = project.context.get(item.context)
            if declared is None:
                problems.append(
                    f"{where}: context feature {item.context!r} is not declared in "
                    f"{project.file} (declared: {', '.join(project.context) or 'none'})"
                )
                continue
            specs.append(
                FeatureSpec(
                    item.name, "context", None, item.context, item.encoding, item.group or "context"
                )
            )
            continue
        view_name, _, field = (item.feature or "").partition(":")
        view = views.get(view_name)
        if view is None:
            problems.append(f"{where}: no feature view {view_name!r} in the Feast registry")
            continue
        if view.entity == "other":
            problems.append(f"{where}: view {view_name!r} is keyed by neither users nor items")
            continue
        if ITEM_PLACEHOLDER in field:
            if view.entity != "user":
                problems.append(f"{where}: {{item_id}} fields belong to user views")
                continue
            if not template_fields(field, view.fields):
                problems.append(f"{where}: view {view_name!r} has no field like {field!r}")
                continue
        elif field not in view.fields:
            problems.append(f"{where}: view {view_name!r} has no field {field!r}")
            continue
        if view.entity == "item" and view_name != project.spec.item_view:
            problems.append(
                f"{where}: item features are read from the project's item_view "
                f"({project.spec.item_view!r}), not {view_name!r}"
            )
            continue
        specs.append(
            FeatureSpec(
                item.name, view.entity, view_name, field, item.encoding, item.group or view_name
            )
        )
    if problems:
        raise FeatureRepoError("; ".join(problems), 422)
    return specs
