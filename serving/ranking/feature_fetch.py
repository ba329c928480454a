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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feast import FeatureStore, FeatureView, RepoConfig
from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type
from google.protobuf.timestamp_pb2 import Timestamp

from features import applied
from features.spec import ViewInfo
from features.streaming import decayed, through_of
from features.tables import load_catalogue
from features.vector import ItemTable
from rankgate.core import redis_calls
from rankgate.core.project import ItemId, Project
from rankgate.core.redis_calls import VARY, Packed

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


SCALARS = frozenset(
    {"int32_val", "int64_val", "float_val", "double_val", "bool_val", "string_val", "bytes_val"}
)
SCALAR_TYPES = (int, float, bool, str, bytes)


def python_value(value: Value) -> Any:
    """A Feast value as Python: scalars directly (the common case on the request path),
    everything else through Feast's own conversion."""
    kind = value.WhichOneof("val")
    if kind in SCALARS:
        return getattr(value, kind)
    return feast_value_type_to_python_type(value)


@dataclass(frozen=True)
class ReadPlan:
    """One HMGET for several user views: Feast's hash fields of each view (its
    features and its `_ts:` field), concatenated; `decode` splits the reply."""

    views: list[str]
    fv_names: list[str]
    requested: list[list[str]]
    """Per view, the feature names and then the view's timestamp field, as Feast reads them."""
    hset_keys: list[str | bytes]
    command: Packed
    """HMGET of `hset_keys`, packed once: a request adds the person's key."""

    @classmethod
    def of(
        cls,
        online: RedisOnlineStore,
        config: RepoConfig,
        views: Mapping[str, FeatureView],
        infos: Mapping[str, ViewInfo],
        fields: Mapping[str, list[str]],
    ) -> ReadPlan:
        names, fv_names, requested, hset_keys = [], [], [], []
        for view in sorted(v for v in fields if infos[v].entity == "user"):
            fv_name = _versioned_fv_name(views[view], config)
            # Feast appends the timestamp field to the list it gets: a copy.
            wanted, keys = online._generate_hset_keys_for_features(
                views[view], list(fields[view]), fv_name_override=fv_name
            )
            names.append(view)
            fv_names.append(fv_name)
            requested.append(wanted)
            hset_keys += keys
        return cls(names, fv_names, requested, hset_keys, Packed("HMGET", VARY, *hset_keys))

    def decode(
        self, raw: list[bytes | None], values: ValueCache
    ) -> list[tuple[datetime | None, dict[str, Any] | None]]:
        """Per view, the row time and Python values of the reply, as Feast's
        `_get_features_for_entity` reads them (an empty time field is the epoch, an
        empty value None) and then `python_value`, through `values`."""
        results: list[tuple[datetime | None, dict[str, Any] | None]] = []
        start = 0
        for wanted in self.requested:
            count = len(wanted)
            chunk = raw[start : start + count]
            start += count
            names = wanted[:-1]  # Feast appends the timestamp field last
            if not names:
                results.append((None, None))
                continue
            stamp = Timestamp.FromString(chunk[-1]) if chunk[-1] else Timestamp()
            seconds = stamp.seconds + stamp.nanos / 1_000_000_000.0
            row = dict(zip(names, map(values.value, chunk[:-1]), strict=True))
            results.append((datetime.fromtimestamp(seconds, tz=UTC), row))
        return results


class UserKeys:
    """Feast's Redis key of a person's hash (`_generate_redis_keys_for_entities` of
    one string entity), built by joining bytes: Feast builds an `EntityKey` message
    and serializes it field by field, about 10 us a request. The layout is taken
    from Feast once, with an empty key, and checked against Feast with a probe;
    should it not match (another serialization version), every key comes from
    Feast itself."""

    PROBE = "rankgate-probe-\u00e9"

    def __init__(self, online: RedisOnlineStore, config: RepoConfig, join_key: str) -> None:
        self.online, self.config, self.join_key = online, config, join_key
        empty = self.from_feast("")
        project = config.project.encode("utf-8")
        # ... <type STRING> <length 0> <no bytes> <project>: the head ends before the length.
        self.head = empty[: -len(project) - 4] if empty.endswith(project) else b""
        self.project = project
        self.joined = bool(self.head) and self.joined_key(self.PROBE) == self.from_feast(self.PROBE)

    def from_feast(self, key: str) -> bytes:
        entity = EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=key)])
        (redis_key,) = self.online._generate_redis_keys_for_entities(self.config, [entity])
        return redis_key

    def joined_key(self, key: str) -> bytes:
        encoded = key.encode("utf-8")
        return b"".join((self.head, len(encoded).to_bytes(4, "little"), encoded, self.project))

    def of(self, key: str) -> bytes:
        return self.joined_key(key) if self.joined else self.from_feast(key)


class ValueCache:
    """Python values of Feast's serialized values (protobuf `Value` bytes), by their
    bytes: a person's row repeats the values of everyone else's (counts, flags,
    categories), so most of a row's fields cost a dictionary lookup instead of a
    protobuf parse and a conversion (165 fields a row in the example). Only
    immutable scalars are kept, at most `limit` of them (then no more are added:
    the common values came first)."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self.values: dict[bytes, Any] = {}

    def value(self, raw: bytes | None) -> Any:
        if not raw:
            return None
        try:
            return self.values[raw]
        except KeyError:
            pass
        value = python_value(Value.FromString(raw))
        if len(self.values) < self.limit and isinstance(value, SCALAR_TYPES):
            self.values[raw] = value
        return value


class FeatureFetcher:
    """Reads the online store of one project's Feast repository (one home)."""

    def __init__(
        self,
        store: FeatureStore,
        project: Project,
        data_dir: Path,
        catalogue_file: Path | None = None,
    ) -> None:
        """`catalogue_file`: the catalogue's table when it was fetched (a cluster)."""
        self.store = store
        self.config = store.config
        self.project = project
        self.online = RedisOnlineStore()
        views = store.list_feature_views()
        described = applied.of_feast(views)
        self.described = described
        """The views as plain descriptions (names, fields, TTLs, source files)."""
        self.views = {view.name: view for view in views}
        self.infos: dict[str, ViewInfo] = applied.infos(described, project)
        self.ttl_s = {view.name: view.ttl_s for view in described if view.ttl_s}
        self.user_join_key = project.spec.user.join_key
        self.item_join_key = project.spec.item.join_key
        self.data_dir, self.catalogue_file = data_dir, catalogue_file
        self.catalogue: list[ItemId] = load_catalogue(project, described, data_dir, catalogue_file)
        self.streaming_defaults = {
            name: spec.default for name, spec in project.streaming.items() if name in self.views
        }
        self.half_life_s = {name: spec.half_life_s for name, spec in project.streaming.items()}
        self.items = self.read_items()
        self.items_loaded_at = time.monotonic()
        self._plans: dict[tuple[tuple[str, tuple[str, ...]], ...], ReadPlan] = {}
        self.values = ValueCache()
        self.user_keys = UserKeys(self.online, self.config, self.user_join_key)
        self.item_listeners: list[Callable[[ItemTable], Awaitable[Callable[[], None]]]] = []
        """Given each refreshed table before it is swapped in: what they need of it is
        prepared off the event loop, and the `apply` they return runs in the same step
        as the swap (the item indexes and the request rules change with the table)."""

    def _item_entity(self, item_id: ItemId) -> EntityKey:
        value = Value(int64_val=item_id) if isinstance(item_id, int) else Value(string_val=item_id)
        return EntityKey(join_keys=[self.item_join_key], entity_values=[value])

    def read_items(self, catalogue: list[ItemId] | None = None) -> ItemTable:
        """Item view of the catalogue (default: the loaded one), read from the online
        store (sync); without an item view, the catalogue's ids with no attributes."""
        catalogue = self.catalogue if catalogue is None else catalogue
        name = self.project.spec.item_view
        if name is None:
            return ItemTable({item_id: {} for item_id in catalogue})
        rows = self.online.online_read(
            self.config,
            self.views[name],
            [self._item_entity(i) for i in catalogue],
            list(self.infos[name].fields),  # a copy: Feast appends to the list it gets
        )
        table: dict[ItemId, dict[str, Any]] = {}
        for item_id, (_, values) in zip(catalogue, rows, strict=True):
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

    def read_catalogue(self) -> tuple[list[ItemId], ItemTable]:
        """The catalogue's source read again (items added or removed), and its item table."""
        catalogue = load_catalogue(self.project, self.described, self.data_dir, self.catalogue_file)
        if catalogue == self.catalogue:
            catalogue = self.catalogue  # the same list: what is cached per catalogue stays
        return catalogue, self.read_items(catalogue)

    async def _refresh_items(self) -> None:
        try:
            catalogue, items = await asyncio.to_thread(self.read_catalogue)
            applies = [await listener(items) for listener in self.item_listeners]
        except Exception as exc:  # noqa: BLE001 - keep serving the table we have
            logger.warning("item table refresh failed, keeping the cached one: %s", exc)
            return
        # One step of the event loop: no request sees the new table with the old index.
        self.catalogue, self.items = catalogue, items
        for apply in applies:
            apply()

    def read_plan(self, fields: Mapping[str, list[str]]) -> ReadPlan:
        """How to read these fields of the user views: Feast's hash fields per view,
        computed once per field set (a request pays a dictionary lookup)."""
        key = tuple((view, tuple(names)) for view, names in sorted(fields.items()))
        plan = self._plans.get(key)
        if plan is None:
            plan = ReadPlan.of(self.online, self.config, self.views, self.infos, fields)
            self._plans[key] = plan
        return plan

    async def fetch_user(self, user_key: str, fields: Mapping[str, list[str]]) -> UserFeatures:
        """The person's rows of the user views, only the fields named per view: one
        HMGET of Feast's hash of the person (every user view lives in it), decoded
        by Feast."""
        plan = self.read_plan(fields)
        redis_key = self.user_keys.of(user_key)
        client = await self.online._get_client_async(self.config.online_store)
        raw = await redis_calls.read(client, plan.command, redis_key) if plan.hset_keys else []
        now = datetime.now(UTC)
        values: dict[str, Any] = {}
        ages: dict[str, float] = {}
        missing, stale = [], []
        through: float | None = None
        for view, (stamp, row) in zip(plan.views, plan.decode(raw, self.values), strict=True):
            converted = row or {}
            # Feast answers an unknown entity with an epoch timestamp and empty values.
            if stamp is None or all(value is None for value in converted.values()):
                stamp = None
            age = None if stamp is None else (now - stamp).total_seconds()
            expired = age is not None and view in self.ttl_s and age > self.ttl_s[view]
            if view in self.streaming_defaults:
                if stamp is None or expired:
                    default = self.streaming_defaults[view]
                    values.update(dict.fromkeys(fields[view], default))
                    continue
                through = max(through or 0.0, through_of(stamp))
            if stamp is None or age is None:
                missing.append(view)
                continue
            if expired:
                stale.append(view)
            ages[view] = age
            if view in self.streaming_defaults:
                # Counts as of now: what training computes for the moment of a decision.
                half_life = self.half_life_s[view]
                for name, value in converted.items():
                    if isinstance(value, float):
                        converted[name] = decayed(value, age, half_life)
            values.update(converted)
        return UserFeatures(values, ages, missing, stale, through)
