"""The Feast repository of a project, opened for one home.

The project's repository is a plain Feast repository (its feature_store.yaml and
definition files work with Feast's own CLI). rankgate reads the same files and
keeps three things per home: the registry (in the home), the Feast project name
(the home's namespace, so two homes sharing one Redis never meet) and the Redis
address (REDIS_URL or the embedded server). Everything else (provider, offline
store, the definitions) is the repository's own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from feast import Entity, FeatureStore, FeatureView, RepoConfig
from feast.infra.offline_stores.offline_store import OfflineStore
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.repo_config import FeastConfigBaseModel

from features import applied
from features.spec import ViewInfo
from rankgate.core.errors import ConfigError, FeatureRepoError
from rankgate.core.home import Home
from rankgate.core.project import DATA_DIR_VARIABLE, ItemId, Project
from rankgate.core.redis_server import (
    SERVING_REDIS_OPTIONS,
    feast_connection_string,
    feast_redis_type,
    resolve_redis_url,
)
from rankgate.core.settings import Settings, get_project, get_settings

# How Feast encodes entity keys into Redis key names; whoever reads those names
# back (rankgate.ops.erasure) decodes them with the same version.
ENTITY_KEY_SERIALIZATION_VERSION = 3


def repo_settings(project: Project) -> dict[str, Any]:
    """The repository's feature_store.yaml as written (no variables expanded)."""
    path = project.feast_repo / "feature_store.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a mapping")
    online = raw.get("online_store") or {}
    kind = online.get("type") if isinstance(online, dict) else online
    if kind != "redis":
        raise ConfigError(
            f"{path}: field 'online_store.type': rankgate serves from Feast's Redis "
            f"online store (type: redis), not {kind!r}"
        )
    version = raw.get("entity_key_serialization_version", ENTITY_KEY_SERIALIZATION_VERSION)
    if version != ENTITY_KEY_SERIALIZATION_VERSION:
        raise ConfigError(
            f"{path}: field 'entity_key_serialization_version': rankgate needs "
            f"{ENTITY_KEY_SERIALIZATION_VERSION} (erasure decodes the keys), not {version}"
        )
    return raw


class ServingOfflineStoreConfig(FeastConfigBaseModel):
    """The offline store of the serving replicas' Feast configuration: none.

    Replicas only read the online store and push to it; the project's offline
    store (Feast's file store by default) is for setup, training and replay.
    Naming it in the replicas would import its library anyway when the
    configuration is validated (the file store imports dask: ~27 MB and half a
    second in each replica)."""

    type: Literal["features.store.ServingOfflineStore"] = "features.store.ServingOfflineStore"


class ServingOfflineStore(OfflineStore):
    """What Feast would open for ServingOfflineStoreConfig: refuses (nothing in a
    replica reads or writes offline data)."""

    def __init__(self) -> None:
        raise FeatureRepoError(
            "the serving replicas' Feast configuration has no offline store "
            "(they read and push online only)"
        )


def registry_path(home: Home, store: str | None) -> str:
    """Where the Feast registry lives: in the artifact store when there is one
    (RANKGATE_STORE; Feast reads and writes `s3://` and `gs://` registries itself),
    else in the home."""
    if store is None:
        return str(home.feast_dir / "registry.db")
    from model_store.artifacts import ArtifactStore

    return ArtifactStore(store).registry_path


def repo_config(
    home: Home,
    redis_url: str,
    serving: bool = False,
    project: Project | None = None,
    store: str | None = None,
) -> RepoConfig:
    """The home's Feast configuration; `serving`: as the replicas use it (serving
    Redis options, no offline store); `store`: the artifact store's URI, whose
    registry it reads."""
    project = project or get_project()
    raw = repo_settings(project)
    connection = feast_connection_string(redis_url) + (SERVING_REDIS_OPTIONS if serving else "")
    return RepoConfig(
        project=home.namespace,
        provider=raw.get("provider", "local"),
        registry={"registry_type": "file", "path": registry_path(home, store)},
        # skip_dedup: rows are written as given (one round trip). The event consumer
        # serializes the updates of a person itself, and `rankgate events replay` must
        # be able to write a row again with the timestamp it had.
        online_store=RedisOnlineStoreConfig(
            redis_type=feast_redis_type(redis_url), connection_string=connection, skip_dedup=True
        ),
        offline_store=(
            ServingOfflineStoreConfig() if serving else raw.get("offline_store", {"type": "file"})
        ),
        repo_path=project.feast_repo,
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
    )


def feature_store(
    settings: Settings | None = None,
    redis_url: str | None = None,
    serving: bool = False,
    project: Project | None = None,
    home: Home | None = None,
) -> FeatureStore:
    settings = settings or get_settings()
    home = home or Home.from_settings(settings)
    home.feast_dir.mkdir(parents=True, exist_ok=True)
    url = redis_url or resolve_redis_url(settings)
    return FeatureStore(
        config=repo_config(
            home, url, serving, project or get_project(settings), store=settings.store
        )
    )


@contextmanager
def _inside(repo: Path, data_dir: Path) -> Iterator[None]:
    """Feast imports definition files by module path from the repository folder,
    as its CLI does from there; the modules are forgotten afterwards, so a second
    repository with a `definitions.py` of its own is read afresh."""
    before_modules = set(sys.modules)
    before_cwd = Path.cwd()
    before_data = os.environ.get(DATA_DIR_VARIABLE)
    os.environ[DATA_DIR_VARIABLE] = str(data_dir)
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    try:
        yield
    finally:
        os.chdir(before_cwd)
        sys.path.remove(str(repo))
        for name in set(sys.modules) - before_modules:
            del sys.modules[name]
        if before_data is None:
            os.environ.pop(DATA_DIR_VARIABLE, None)
        else:
            os.environ[DATA_DIR_VARIABLE] = before_data


def read_definitions(project: Project, data_dir: Path) -> list[Entity | FeatureView]:
    """The entities and feature views the repository's files define."""
    from feast.repo_operations import parse_repo

    sys.dont_write_bytecode = True
    try:
        with _inside(project.feast_repo, data_dir):
            contents = parse_repo(project.feast_repo)
    except Exception as exc:
        raise FeatureRepoError(f"{project.feast_repo}: its definitions do not load: {exc}") from exc
    finally:
        sys.dont_write_bytecode = False
    return [*contents.entities, *contents.feature_views]


def check_definitions(project: Project, objects: list[Entity | FeatureView]) -> list[str]:
    """What the project file says of the repository that the repository contradicts."""
    entities = {o.name: o for o in objects if isinstance(o, Entity)}
    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    file, spec = project.file, project.spec
    problems = []
    for field, declared in (("user", spec.user), ("item", spec.item)):
        entity = entities.get(declared.entity)
        if entity is None:
            problems.append(
                f"{file}: field '{field}.entity': the repository defines no entity "
                f"{declared.entity!r} (it has: {', '.join(sorted(entities)) or 'none'})"
            )
        elif entity.join_key != declared.join_key:
            problems.append(
                f"{file}: field '{field}.join_key': entity {declared.entity!r} joins on "
                f"{entity.join_key!r}, not {declared.join_key!r}"
            )
    item_entity = entities.get(spec.item.entity)
    if item_entity is not None:
        from feast import ValueType

        want = ValueType.INT64 if spec.item.id_type == "int" else ValueType.STRING
        if item_entity.value_type not in (want, ValueType.UNKNOWN) and not (
            spec.item.id_type == "int" and item_entity.value_type == ValueType.INT32
        ):
            problems.append(
                f"{file}: field 'item.id_type': {spec.item.id_type} ids, but entity "
                f"{spec.item.entity!r} is {item_entity.value_type.name}"
            )
    for field, name in (("item_view", spec.item_view), ("catalogue.view", spec.catalogue.view)):
        if name is None:
            continue
        view = views.get(name)
        if view is None:
            problems.append(
                f"{file}: field {field!r}: the repository defines no feature view {name!r}"
            )
        elif spec.item.entity not in view.entities:
            problems.append(
                f"{file}: field {field!r}: view {name!r} is not keyed by the item entity "
                f"{spec.item.entity!r}"
            )
    problems += check_streaming_views(project, views)
    return problems


def is_float(field: Any) -> bool:
    from feast.types import Float32, Float64

    return field.dtype in (Float32, Float64)


def check_streaming_views(project: Project, views: Mapping[str, FeatureView]) -> list[str]:
    """Each `streaming` entry names a view keyed by the user entity alone, fed by a
    PushSource of the declared name (`per: total`: with its float field)."""
    from feast.data_source import PushSource

    file, problems = project.file, []
    for n, streaming in enumerate(project.spec.streaming):
        where = f"{file}: field 'streaming.{n}"
        view = views.get(streaming.view)
        if view is None:
            problems.append(
                f"{where}.view': the repository defines no feature view {streaming.view!r}"
            )
            continue
        if view.entities != [project.spec.user.entity]:
            problems.append(
                f"{where}.view': view {view.name!r} is keyed by "
                f"{', '.join(view.entities) or 'no entity'}, not by the user entity "
                f"{project.spec.user.entity!r} alone (a streaming view holds a person's counts)"
            )
        source = view.stream_source
        if not isinstance(source, PushSource):
            problems.append(
                f"{where}.push_source': view {view.name!r} has no PushSource as its source "
                f"({type(view.batch_source).__name__}): the event stream writes it through "
                "Feast's push path"
            )
        elif source.name != streaming.push_source:
            problems.append(
                f"{where}.push_source': view {view.name!r} is fed by the push source "
                f"{source.name!r}, not {streaming.push_source!r}"
            )
        if streaming.per == "total":
            field = next((f for f in view.features if f.name == streaming.field), None)
            if field is None or not is_float(field):
                problems.append(
                    f"{where}.field': view {view.name!r} has no float field {streaming.field!r}"
                )
    return problems


def check_streaming_fields(
    project: Project, views: Sequence[FeatureView], catalogue: Sequence[ItemId]
) -> list[str]:
    """Each `per: item` streaming view has a float field for every catalogue item."""
    from features.spec import item_field

    by_name = {v.name: v for v in views}
    problems = []
    for n, streaming in enumerate(project.spec.streaming):
        view = by_name.get(streaming.view)
        if view is None or streaming.per != "item":
            continue
        floats = {f.name for f in view.features if is_float(f)}
        missing = [i for i in catalogue if item_field(streaming.field, i) not in floats]
        if missing:
            shown = ", ".join(item_field(streaming.field, i) for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(
                f"{project.file}: field 'streaming.{n}.field': view {view.name!r} lacks a float "
                f"field for {len(missing)} of the {len(catalogue)} catalogue items: "
                f"{shown}{more}"
            )
    return problems


def checked_definitions(project: Project, data_dir: Path) -> list[Entity | FeatureView]:
    """The repository's definitions, refused (naming file and field) where they
    contradict the project file."""
    objects = read_definitions(project, data_dir)
    problems = check_definitions(project, objects)
    if problems:
        raise FeatureRepoError("; ".join(problems), 422)
    return objects


def checked_streaming_fields(
    project: Project, views: Sequence[FeatureView], catalogue: Sequence[ItemId]
) -> None:
    """check_streaming_fields, refused as checked_definitions refuses."""
    problems = check_streaming_fields(project, views, catalogue)
    if problems:
        raise FeatureRepoError("; ".join(problems), 422)


def apply(
    store: FeatureStore,
    project: Project,
    home: Home,
    objects: list[Entity | FeatureView] | None = None,
) -> list[str]:
    """Register the repository's entities and views for this home, and remove the ones
    it no longer defines (idempotent). Returns the view names."""
    objects = objects if objects is not None else checked_definitions(project, home.data_dir)
    names = {o.name for o in objects}
    gone: list[Entity | FeatureView] = [
        *(v for v in store.list_feature_views() if v.name not in names),
        *(e for e in store.list_entities() if e.name not in names),
    ]
    store.apply(objects, objects_to_delete=gone, partial=not gone)  # type: ignore[arg-type]
    return [v.name for v in store.list_feature_views()]


def materialize(
    store: FeatureStore, end: datetime | None = None, skip: Collection[str] = ()
) -> list[str]:
    """Copy the latest feature rows of every view but `skip` (the streaming views,
    whose rows come only from the event stream) into the online store (Redis).
    Returns the views materialized."""
    end = end or datetime.now(UTC) + timedelta(minutes=1)
    names = [v.name for v in store.list_feature_views() if v.name not in skip]
    if names:
        store.materialize(start_date=end - timedelta(days=3650), end_date=end, feature_views=names)
    return names


def view_infos(views: list[FeatureView], project: Project) -> dict[str, ViewInfo]:
    """Each view's entity (user, item or other) and fields, as the builder needs them."""
    return applied.infos(applied.of_feast(views), project)
