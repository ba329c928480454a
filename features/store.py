"""Build the Feast FeatureStore of a home, and the `features apply/materialize` steps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from feast import FeatureStore, RepoConfig
from feast.infra.online_stores.redis import RedisOnlineStoreConfig

from features.definitions import feature_objects
from rankgate.example_data import prepared
from rankgate.home import Home
from rankgate.redis_server import (
    SERVING_REDIS_OPTIONS,
    feast_connection_string,
    resolve_redis_url,
)
from rankgate.settings import Settings, get_settings

# How Feast encodes entity keys into Redis key names; whoever reads those names
# back (rankgate.privacy) decodes them with the same version.
ENTITY_KEY_SERIALIZATION_VERSION = 3


def repo_config(home: Home, redis_url: str, serving: bool = False) -> RepoConfig:
    connection = feast_connection_string(redis_url) + (SERVING_REDIS_OPTIONS if serving else "")
    return RepoConfig(
        project=home.namespace,
        provider="local",
        registry={"registry_type": "file", "path": str(home.feast_dir / "registry.db")},
        online_store=RedisOnlineStoreConfig(connection_string=connection),
        offline_store={"type": "file"},
        repo_path=home.feast_dir,
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
    )


def feature_store(
    settings: Settings | None = None, redis_url: str | None = None, serving: bool = False
) -> FeatureStore:
    settings = settings or get_settings()
    home = Home.from_settings(settings)
    home.feast_dir.mkdir(parents=True, exist_ok=True)
    url = redis_url or resolve_redis_url(settings)
    return FeatureStore(config=repo_config(home, url, serving))


def apply(store: FeatureStore, home: Home) -> list[str]:
    """Register entities and views (idempotent). Returns the view names."""
    objects = feature_objects(prepared(home))
    store.apply(objects)  # type: ignore[arg-type]
    return [v.name for v in store.list_feature_views()]


def materialize(store: FeatureStore, end: datetime | None = None) -> None:
    """Copy the latest feature rows of every view into the online store (Redis)."""
    end = end or datetime.now(UTC) + timedelta(minutes=1)
    store.materialize(start_date=end - timedelta(days=3650), end_date=end)
