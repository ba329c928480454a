"""A rankgate project: one folder, declared by one typed file, `rankgate.yaml`.

A project is what an ML engineer brings: a Feast repository (a real one, usable
with Feast's own CLI), the user and item entities of that repository, where the
catalogue and the interaction logs come from, the policy files, optional
request-context features a model may read, and the models `rankgate setup`
trains when a home has none. Nothing outside a project knows its shape: the
serving path reads item ids, view names and fields from here and from the
models' declarations (features.vector.ModelInput).

Paths in the file are relative to the project folder; `${VAR}` is replaced by
the environment variable, and `${RANKGATE_DATA_DIR}` by the home's data folder,
where a project's `prepare` step writes what it derives (the example derives
user ids and keys its tables by their pseudonymous key).

Select a project with `--project DIR` or `RANKGATE_PROJECT`; the default is the
project `examples/default` links to (data, not code, names it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rankgate.core.config_files import Strict, load_yaml_model
from rankgate.core.errors import ConfigError

PROJECT_FILE = "rankgate.yaml"
DATA_DIR_VARIABLE = "RANKGATE_DATA_DIR"
ItemId = int | str
NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


class UserEntity(Strict):
    """The person being ranked for. Feast knows them only by their pseudonymous key
    (an HMAC of the application's user id, a string): the raw id never reaches it."""

    entity: str
    """Name of the Feast entity of users in the project's repository."""
    join_key: str
    """Its join key: the column of the user views that holds the pseudonymous key."""


class ItemEntity(Strict):
    """An item of the catalogue."""

    entity: str
    """Name of the Feast entity of items in the project's repository."""
    join_key: str
    """Its join key (the column of item ids in the item view and the logs)."""
    id_type: Literal["int", "string"]
    """Type of item ids: `int` (JSON integers) or `string`. Requests, policy rules and
    fallback boosts must use this type; the OpenAPI document says which."""


class Catalogue(Strict):
    """Where the list of items comes from: the rows of the item view's offline source,
    or a file (CSV or Parquet) with a column of item ids."""

    view: str | None = None
    """A Feast feature view keyed by the item entity: every item id of its source."""
    file: str | None = None
    """A CSV or Parquet file (relative to the project) with one row per item."""
    column: str | None = None
    """Column of item ids in `file` (default: the item entity's join key)."""

    @model_validator(mode="after")
    def _one_source(self) -> Catalogue:
        if (self.view is None) == (self.file is None):
            raise ValueError("name exactly one of `view` or `file`")
        return self


class Interactions(Strict):
    """Logged impressions and their outcomes: the popularity fallback counts them and
    `rankgate model train` learns from them."""

    path: str
    """A Parquet or CSV file (relative to the project; `${RANKGATE_DATA_DIR}` allowed)."""
    item_column: str
    """Column of the shown item's id."""
    outcome_column: str
    """Column of the outcome (1: clicked / converted, 0: not)."""
    user_column: str | None = None
    """Column of the person's pseudonymous key (needed to train, not for popularity)."""
    time_column: str | None = None
    """Column of the impression time (training holds out the latest impressions)."""
    position_column: str | None = None
    """Column of the shown item's position in its slate (1-based); absent: every row
    is position 1. Off-policy evaluation (`rankgate model evaluate`) reads it."""
    propensity_column: str | None = None
    """Column of the probability with which the logging policy showed this item at
    this position: what off-policy evaluation needs of a log."""


class DataRegions(Strict):
    """Where the region of each person in the interaction log is read: `model train`
    records the regions of the people a version learned from in its lineage, and the
    policy's `residency` rules decide, by them, which requests it may answer."""

    column: str
    """The column of region codes (regions of the policy, e.g. EU, US)."""
    path: str | None = None
    """A table of people (Parquet or CSV, relative to the project; `${RANKGATE_DATA_DIR}`
    allowed) with the user join key column and `column`; unset: `column` is a column of
    the interaction log itself (the region each impression's person was in)."""
    cleared_for_transfer: list[str] = Field(default_factory=list)
    """Data regions whose people's data in this log was cleared for transfer to other
    regions (a residency rule may accept it with `cleared_for_transfer`)."""


class ContextFeature(Strict):
    """A request-context value a model may read (`context.<name>` in the request)."""

    name: str
    """The key in the request's `context` object (lower-case letters, digits, _)."""
    type: Literal["string", "number"] = "string"
    """`string` values are encoded by hash; `number` values must parse as a number."""
    values: list[str] | None = None
    """Allowed values (strings only); unset: any value within the request limits."""
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("lower-case letters, digits and _, starting with a letter")
        return value


class SetupModel(Strict):
    """A model version `rankgate setup` trains on the interactions when a home lacks it."""

    version: str
    """Version name (letters, digits, . _ -)."""
    features: str
    """Declaration of its inputs (a FEATURES.yaml, relative to the project)."""
    trainer: Literal["lightgbm", "logistic_regression"] = "lightgbm"
    """What is fitted: LightGBM trees, or scikit-learn's LogisticRegression on
    standardized inputs (a linear model learns from a feature too sparse for a tree
    to split on, such as a recent-clicks count on a small log)."""
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    """Settings of the trainer: LightGBM's (`rankgate model train --params` accepts the
    same), or LogisticRegression's (model_store.train.LogisticParams)."""


def named(value: dict[str, Any]) -> dict[str, Any]:
    """A mapping whose keys are names: lower-case letters, digits and _, from a letter."""
    for name in value:
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r}: lower-case letters, digits and _, from a letter")
    return value


class EventField(Strict):
    """A field an event type carries beside the common ones (`fields.<name>`)."""

    type: Literal["string", "number"] = "string"
    required: bool = True


class EventType(Strict):
    """A kind of behaviour the application reports (`POST /v1/events`)."""

    fields: dict[str, EventField] = Field(default_factory=dict)
    """Fields of this type, by name (lower-case letters, digits and _)."""
    description: str = ""

    @field_validator("fields")
    @classmethod
    def _names(cls, value: dict[str, EventField]) -> dict[str, EventField]:
        return named(value)


class Outcomes(Strict):
    """Which event types are outcomes of a decision: joined to it by `request_id`."""

    impression: str | None = None
    """The type that says an item of the answer was shown."""
    click: str | None = None
    """The type that says a shown item was clicked (click rate = clicks / impressions)."""
    conversion: str | None = None
    """The type that says a shown item was bought (counted, joined like clicks)."""


class EventsConfig(Strict):
    """The events the application reports, and which of them are outcomes."""

    types: dict[str, EventType] = Field(min_length=1)
    """Accepted event types by name; any other type is refused (422)."""
    outcomes: Outcomes = Outcomes()

    @field_validator("types")
    @classmethod
    def _type_names(cls, value: dict[str, EventType]) -> dict[str, EventType]:
        return named(value)

    @model_validator(mode="after")
    def _outcomes_declared(self) -> EventsConfig:
        for role, name in self.outcomes.model_dump().items():
            if name is not None and name not in self.types:
                raise ValueError(f"outcomes.{role}: {name!r} is not a declared event type")
        return self


class StreamingView(Strict):
    """A Feast feature view the event stream keeps up to date through Feast's push
    path: a decayed count of the person's recent events per item (or in total).

    The view must be keyed by the user entity, have a `PushSource` as its source and
    a float field for each key: `field` with `{item_id}` replaced by each catalogue
    item's id (`per: item`), or one field (`per: total`). A person without a row,
    or whose row is older than the view's TTL, reads as `default` (no recent events
    is normal, not a missing feature)."""

    view: str
    """Name of the feature view in the project's Feast repository."""
    push_source: str
    """Name of its PushSource (what `store.push` is given)."""
    events: list[str] = Field(min_length=1)
    """Event types that count."""
    per: Literal["item", "total"] = "item"
    field: str
    """Field name; with `per: item` it holds `{item_id}`."""
    half_life_s: float = Field(gt=0)
    """An event counts 1 when it happens and half as much `half_life_s` later."""
    default: float = 0.0

    @model_validator(mode="after")
    def _template(self) -> StreamingView:
        has_slot = "{item_id}" in self.field
        if (self.per == "item") != has_slot:
            raise ValueError("`field` holds {item_id} exactly when `per` is item")
        return self


class ProjectFile(Strict):
    """`rankgate.yaml`: what one project serves."""

    name: str
    """Short name of the project (lower-case letters, digits and _)."""
    description: str = ""
    feast_repo: str = "feature_repo"
    """Folder of the project's Feast repository (with its feature_store.yaml)."""
    policies: str = "policies"
    """Folder with policy.yaml (purposes, regions, item rules), fallback.yaml and
    reasons.yaml."""
    user: UserEntity
    item: ItemEntity
    item_view: str | None = None
    """The feature view of item attributes (keyed by the item entity): read whole into
    memory by each replica and refreshed in the background. Unset: none."""
    catalogue: Catalogue
    interactions: Interactions | None = None
    """Logged outcomes; needed by the popularity fallback and by `model train`."""
    data_regions: DataRegions | None = None
    """Where the region of each person in the interaction log is read (the lineage of
    trained versions; residency in policy.yaml). Unset: trained versions record no
    data regions, and a residency rule accepts none of them."""
    context: list[ContextFeature] = Field(default_factory=list)
    """Request-context features models may read."""
    prepare: str | None = None
    """A Python file of the project whose `prepare(data_dir)` writes derived tables into
    the home's data folder before Feast reads them (optional). It may also define
    `demo_user_ids()`, the ids `rankgate setup --demo-consent` makes up consent for
    (an example's or a generated sample's people, never real ones)."""
    setup_models: list[SetupModel] = Field(default_factory=list)
    """Versions `rankgate setup` trains when the home has none of that name."""
    events: EventsConfig | None = None
    """Event types `POST /v1/events` accepts; unset: the project takes no events."""
    streaming: list[StreamingView] = Field(default_factory=list)
    """Feature views kept fresh from the event stream."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("lower-case letters, digits and _, starting with a letter")
        return value

    @model_validator(mode="after")
    def _distinct_context(self) -> ProjectFile:
        names = [c.name for c in self.context]
        if len(set(names)) != len(names):
            raise ValueError("context: each feature name once")
        views = [s.view for s in self.streaming]
        if len(set(views)) != len(views):
            raise ValueError("streaming: each view once")
        for index, streaming in enumerate(self.streaming):
            known = self.events.types if self.events else {}
            for name in streaming.events:
                if name not in known:
                    raise ValueError(
                        f"streaming.{index}.events: {name!r} is not a declared event type"
                    )
        return self


@dataclass(frozen=True)
class Project:
    """A loaded project: its folder and its declaration."""

    root: Path
    spec: ProjectFile

    @property
    def file(self) -> Path:
        return self.root / PROJECT_FILE

    @property
    def name(self) -> str:
        return self.spec.name

    def path(self, value: str, data_dir: Path | None = None) -> Path:
        """A path of the file: `${VAR}` expanded, relative to the project folder."""
        env = dict(os.environ)
        if data_dir is not None:
            env[DATA_DIR_VARIABLE] = str(data_dir)
        expanded = re.sub(
            r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), m.group(0)), value
        )
        if "${" in expanded:
            raise ConfigError(f"{self.file}: {value!r}: an environment variable is not set")
        path = Path(expanded)
        return path if path.is_absolute() else self.root / path

    @property
    def feast_repo(self) -> Path:
        return self.path(self.spec.feast_repo)

    @property
    def policies(self) -> Path:
        return self.path(self.spec.policies)

    @property
    def item_type(self) -> type[int | str]:
        return int if self.spec.item.id_type == "int" else str

    def item_id(self, value: Any) -> ItemId:
        """An item id read from a file, as the project's type."""
        return int(value) if self.spec.item.id_type == "int" else str(value)

    @cached_property
    def streaming(self) -> dict[str, StreamingView]:
        """Streaming views by name."""
        return {s.view: s for s in self.spec.streaming}

    @cached_property
    def context(self) -> dict[str, ContextFeature]:
        return {c.name: c for c in self.spec.context}

    @cached_property
    def prepare_module(self) -> ModuleType | None:
        """The project's prepare.py, imported once per process."""
        if self.spec.prepare is None:
            return None
        path = self.path(self.spec.prepare)
        if not path.is_file():
            raise ConfigError(f"{self.file}: field 'prepare': {path} does not exist")
        loader = importlib.util.spec_from_file_location(f"rankgate_project_{self.name}", path)
        if loader is None or loader.loader is None:
            raise ConfigError(f"{self.file}: field 'prepare': {path} is not a Python file")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module

    def prepare_function(self) -> Callable[[Path], object] | None:
        module = self.prepare_module
        if module is None:
            return None
        function = getattr(module, "prepare", None)
        if not callable(function):
            raise ConfigError(f"{self.spec.prepare}: defines no `prepare(data_dir)` function")
        return function  # type: ignore[no-any-return]

    def demo_user_ids(self) -> list[str]:
        """The demo users the project's prepare module names (none without one): whom
        `rankgate setup --demo-consent` makes up consent for."""
        module = self.prepare_module
        function = getattr(module, "demo_user_ids", None) if module else None
        return list(function()) if callable(function) else []

    def sources(self) -> Iterator[Path]:
        """Every file of the project that what setup prepares depends on, in a stable
        order: the declaration, the Feast repository, the policies, the prepare step,
        model declarations and every data file under the folder."""
        skip = {"__pycache__", ".ipynb_checkpoints"}
        for path in sorted(self.root.rglob("*")):
            parts = set(path.relative_to(self.root).parts)
            # Feast registries written by hand runs (.db) are outputs, not sources.
            if path.is_file() and not skip & parts and path.suffix not in {".db", ".pyc"}:
                yield path

    def source_digest(self) -> dict[str, str]:
        """sha256 of each source file, by its path relative to the project."""
        return {
            str(path.relative_to(self.root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in self.sources()
        }


def load_project(folder: Path) -> Project:
    """The project in `folder`; ConfigError names the file and the field."""
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such project folder")
    file = folder / PROJECT_FILE
    if not file.is_file():
        raise ConfigError(
            f"{folder}: not a rankgate project (no {PROJECT_FILE}; see `rankgate init`)"
        )
    project = Project(folder, load_yaml_model(file, ProjectFile))
    for field, path in (("feast_repo", project.feast_repo), ("policies", project.policies)):
        if not path.is_dir():
            raise ConfigError(f"{file}: field {field!r}: {path} is not a folder")
    if not (project.feast_repo / "feature_store.yaml").is_file():
        raise ConfigError(
            f"{file}: field 'feast_repo': {project.feast_repo} has no feature_store.yaml"
        )
    return project
