"""Online feature fetch from Feast's Redis online store.

User features are read per request (one HMGET per view, concurrently, through
Feast's async Redis read); item features change rarely and are held in memory
as an encoded `ItemTable`, re-read every `item_refresh_s`. A user feature older
than its view's TTL is stale, and the request degrades rather than ranking on it.

Streaming views (rankgate.yaml `streaming`) are the exception: a person with no
row, or a row older than the TTL, has no recent events, which is normal, so the
view reads as its default. Their row time says which events a decision includes
(`UserFeatures.events_through`, see features/streaming.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feast import FeatureStore
from feast.infra.online_stores.redis import RedisOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type

from features.spec import ViewInfo
from features.store import load_catalogue, view_infos
from features.streaming import decayed, through_of
from features.vector import ItemTable
from rankgate.project import ItemId, Project

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class UserFeatures:
    values: dict[str, Any]
    """Feast field name -> value, over the views read."""
    age_s: dict[str, float]
    """View -> age of its row in seconds (views with no row are absent)."""
    missing_views: list[str]
    stale_views: list[str]
    events_through: float | None = None
    """Acceptance time (Unix s) of the newest event the streaming views read include."""

    @property
    def found(self) -> bool:
        return not self.missing_views


class FeatureFetcher:
    """Reads the online store of one project's Feast repository (one home)."""

    def __init__(self, store: FeatureStore, project: Project, data_dir: Path) -> None:
        self.store = store
        self.config = store.config
        self.project = project
        self.online = RedisOnlineStore()
        views = store.list_feature_views()
        self.views = {view.name: view for view in views}
        self.infos: dict[str, ViewInfo] = view_infos(views, project)
        self.ttl_s = {
            name: view.ttl.total_seconds() for name, view in self.views.items() if view.ttl
        }
        self.user_join_key = project.spec.user.join_key
        self.item_join_key = project.spec.item.join_key
        self.catalogue: list[ItemId] = load_catalogue(project, views, data_dir)
        self.streaming_defaults = {
            name: spec.default for name, spec in project.streaming.items() if name in self.views
        }
        self.half_life_s = {name: spec.half_life_s for name, spec in project.streaming.items()}
        self.items = self.read_items()
        self.items_loaded_at = time.monotonic()

    def _user_entity(self, key: str) -> EntityKey:
        return EntityKey(join_keys=[self.user_join_key], entity_values=[Value(string_val=key)])

    def _item_entity(self, item_id: ItemId) -> EntityKey:
        value = Value(int64_val=item_id) if isinstance(item_id, int) else Value(string_val=item_id)
        return EntityKey(join_keys=[self.item_join_key], entity_values=[value])

    def read_items(self) -> ItemTable:
        """Item view of the whole catalogue, read from the online store (sync, at start);
        without an item view, the catalogue's ids with no attributes."""
        name = self.project.spec.item_view
        if name is None:
            return ItemTable({item_id: {} for item_id in self.catalogue})
        rows = self.online.online_read(
            self.config,
            self.views[name],
            [self._item_entity(i) for i in self.catalogue],
            list(self.infos[name].fields),  # a copy: Feast appends to the list it gets
        )
        table: dict[ItemId, dict[str, Any]] = {}
        for item_id, (_, values) in zip(self.catalogue, rows, strict=True):
            table[item_id] = {
                name: feast_value_type_to_python_type(value)
                for name, value in (values or {}).items()
            }
        return ItemTable(table)

    def refresh_items_if_due(self, every_s: float) -> asyncio.Task[None] | None:
        """Re-read the item table in the background when it is older than `every_s`.

        The request that notices never waits for it; it and the next ones use the
        current table until the new one is swapped in. Returns the task, if any.
        """
        if time.monotonic() - self.items_loaded_at < every_s:
            return None
        self.items_loaded_at = time.monotonic()  # one refresh at a time
        return asyncio.get_running_loop().create_task(self._refresh_items())

    async def _refresh_items(self) -> None:
        try:
            self.items = await asyncio.to_thread(self.read_items)
        except Exception as exc:  # noqa: BLE001 - keep serving the table we have
            logger.warning("item table refresh failed, keeping the cached one: %s", exc)

    async def fetch_user(self, user_key: str, fields: Mapping[str, list[str]]) -> UserFeatures:
        """The person's rows of the user views, only the fields named per view."""
        user_views = sorted(v for v in fields if self.infos[v].entity == "user")
        entity = [self._user_entity(user_key)]
        results = await asyncio.gather(
            *[
                self.online.online_read_async(self.config, self.views[v], entity, list(fields[v]))
                for v in user_views
            ]
        )
        now = datetime.now(UTC)
        values: dict[str, Any] = {}
        ages: dict[str, float] = {}
        missing, stale = [], []
        through: float | None = None
        for view, [(stamp, row)] in zip(user_views, results, strict=True):
            # Feast answers an unknown entity with an epoch timestamp and empty values.
            if stamp is None or not row or all(v.WhichOneof("val") is None for v in row.values()):
                stamp = row = None
            age = None if stamp is None else (now - stamp).total_seconds()
            expired = age is not None and view in self.ttl_s and age > self.ttl_s[view]
            if view in self.streaming_defaults:
                if stamp is None or expired:
                    default = self.streaming_defaults[view]
                    values.update(dict.fromkeys(fields[view], default))
                    continue
                through = max(through or 0.0, through_of(stamp))
            if stamp is None or row is None or age is None:
                missing.append(view)
                continue
            if expired:
                stale.append(view)
            ages[view] = age
            for name, value in row.items():
                values[name] = feast_value_type_to_python_type(value)
            if view in self.streaming_defaults:
                # Counts as of now: what training computes for the moment of a decision.
                half_life = self.half_life_s[view]
                for name in row:
                    if isinstance(values[name], float):
                        values[name] = decayed(values[name], age, half_life)
        return UserFeatures(values, ages, missing, stale, through)
