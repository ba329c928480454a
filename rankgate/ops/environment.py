"""The environment the operator commands share: the settings, the home, the project
and its Redis, opened once per command; the model store, the consent and key stores
and the Feast store come from it on first use (Feast and the model store are
imported then, so that key and user commands stay light)."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankgate.core import redis_keys
from rankgate.core.errors import ModelStoreError, RankgateError
from rankgate.core.home import Home
from rankgate.core.project import ItemId, Project
from rankgate.core.redis_server import RedisClient, connect, resolve_redis_url
from rankgate.core.settings import Settings, get_project, get_settings
from rankgate.governance.api_keys import ApiKeyStore
from rankgate.governance.consent import ConsentStore

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

    from features.applied import AppliedView
    from features.spec import ViewInfo
    from model_store.store import ModelStore

SETUP_FILE = "setup.json"


@dataclass
class Environment:
    settings: Settings
    home: Home
    redis_url: str | None
    project: Project

    @classmethod
    def open(cls, redis: bool = True) -> Environment:
        settings = get_settings()
        home = Home.from_settings(settings)
        project = get_project(settings)
        url = resolve_redis_url(settings) if redis else None
        if url:
            connect(url)  # fail early, naming the address
        return cls(settings, home, url, project)

    @cached_property
    def redis(self) -> RedisClient:
        return connect(self.redis_url)

    @property
    def data_dir(self) -> Path:
        return self.home.data_dir

    @cached_property
    def models(self) -> ModelStore:
        # Imported here, like Feast below: key and user commands open an
        # Environment too and should not pay for the model store's pydantic models.
        from model_store.store import ModelStore

        return ModelStore(self.home)

    @cached_property
    def consent(self) -> ConsentStore:
        return ConsentStore(self.redis, self.home.namespace)

    @cached_property
    def api_keys(self) -> ApiKeyStore:
        return ApiKeyStore(self.redis, self.home.namespace)

    @cached_property
    def feast(self) -> FeatureStore:
        from features.store import feature_store

        return feature_store(self.settings, self.redis_url, project=self.project)

    def marker_key(self, step: str) -> str:
        return redis_keys.setup_marker(self.home.namespace, step)

    def apply_features(self, objects: list[Any] | None = None) -> list[str]:
        from features.store import apply

        names = apply(self.feast, self.project, self.home, objects)
        self._record_views()
        return names

    def feast_views(self) -> list[FeatureView]:
        """The feature views of the applied registry, as Feast reads them (none before
        `features apply`)."""
        if not self.registry.exists():
            return []
        return list(self.feast.list_feature_views())

    @property
    def registry(self) -> Path:
        return self.home.feast_dir / "registry.db"

    def views(self) -> list[AppliedView]:
        """The applied registry's views (none before `features apply`): from the record
        beside the registry while it is this registry's, so that checking a version's
        inputs (`model promote`) or reading the interaction log (`model register`) does
        not import Feast; else from Feast. With an artifact store, Feast reads the
        store's registry: always asked then."""
        from features.applied import of_feast, read_record

        if not self.registry.exists():
            return []
        if self.settings.store is not None:
            return of_feast(self.feast_views())
        recorded = read_record(self.registry)
        return recorded if recorded is not None else self._record_views()

    def view_infos(self) -> dict[str, ViewInfo]:
        """Each applied view's entity and fields, as the feature builder needs them."""
        from features.applied import infos

        return infos(self.views(), self.project)

    def _record_views(self) -> list[AppliedView]:
        from features.applied import of_feast, registry_digest, write_record

        digest = registry_digest(self.registry)
        views = of_feast(self.feast_views())
        if self.settings.store is None:
            write_record(self.registry, digest, views)
        return views

    def catalogue(self) -> list[ItemId]:
        from features.tables import load_catalogue

        views = self.views()
        if not views:  # not applied yet: the repository's own definitions
            from feast import FeatureView

            from features.applied import of_feast
            from features.store import read_definitions

            definitions = read_definitions(self.project, self.data_dir)
            views = of_feast(v for v in definitions if isinstance(v, FeatureView))
        return load_catalogue(self.project, views, self.data_dir)

    def recorded_catalogue(self) -> list[ItemId]:
        """The catalogue as the last setup read it (cheap: no Feast, no pandas)."""
        catalogue = self.recorded().get("catalogue")
        if catalogue is None:
            raise RankgateError(f"{self.home.root} is not set up: run `rankgate setup`")
        return list(catalogue)

    def recorded(self) -> dict[str, Any]:
        path = self.home.root / SETUP_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def key_fingerprint(self) -> str:
        """Names the pseudonymisation key without revealing it."""
        return hmac.new(
            self.settings.user_key_secret.encode(), b"rankgate-setup", hashlib.sha256
        ).hexdigest()[:16]

    def sources(self) -> dict[str, Any]:
        """What the prepared state depends on: the project's files and the key."""
        return {
            "project": str(self.project.root),
            "key_fingerprint": self.key_fingerprint,
            "files": self.project.source_digest(),
        }

    @staticmethod
    def digest(sources: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]

    def materialize(self) -> list[str]:
        """Materialize every view but the streaming ones (their rows come only from the
        event stream); returns the views materialized."""
        from features.store import materialize

        if not self.views():
            raise RankgateError("feature repository not applied: run `rankgate features apply`")
        names = materialize(self.feast, skip=set(self.project.streaming))
        self._record_views()  # Feast wrote the materialized intervals into the registry
        self.redis.set(self.marker_key("materialized"), self.digest(self.sources()))
        return names

    def model_rows(self) -> list[tuple[str, str, str, str, str, str]]:
        rows = []
        for version in self.models.versions():
            report = self.models.check_hashes(version)
            try:
                manifest = self.models.manifest(version)
            except ModelStoreError:
                failures = "corrupt: " + "; ".join(report.failures())
                rows.append((version, failures, "-", "-", "-", "-"))
                continue
            state = "ok" if report.ok else "corrupt: " + "; ".join(report.failures())
            metrics = "-" if manifest.metrics is None else manifest.metrics.shown()
            rows.append(
                (
                    version,
                    state,
                    str(len(manifest.features)),
                    metrics,
                    manifest.created_at.strftime("%Y-%m-%d %H:%M"),
                    manifest.lineage.shown(),
                )
            )
        return rows
