"""Feast declarations: the entities and feature views rankgate reads online.

The offline sources are the parquet files `rankgate setup` prepares in the home
(rankgate.example_data), so the declarations are built for a given home by
`feature_objects(prepared)` instead of at import time.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Float64, String

from rankgate.example_data import AFFINITY_COLUMNS, ITEM_COLUMNS, PROFILE_COLUMNS, PreparedData

# A person, known to the feature store only by their pseudonymous key: an HMAC of
# the application's user id (rankgate.pseudonym). The raw id never reaches Feast,
# so it never reaches Redis either.
user = Entity(
    name="user",
    join_keys=["user_key"],
    value_type=ValueType.STRING,
    description="A visitor, keyed by the HMAC of their user id.",
)

# An item of the catalogue (80 fashion items in the example data).
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="A catalogue item.",
)

VISITOR_PROFILE = "visitor_profile"
USER_ITEM_AFFINITY = "user_item_affinity"
ITEM_CONTEXT = "item_context"

# Feature age limits. User features are read per request and must be recent;
# item attributes change rarely and are cached in memory by the server.
TTL = {
    VISITOR_PROFILE: timedelta(days=90),
    USER_ITEM_AFFINITY: timedelta(days=30),
    ITEM_CONTEXT: timedelta(days=365),
}

VIEW_FIELDS: dict[str, tuple[str, ...]] = {
    VISITOR_PROFILE: tuple(PROFILE_COLUMNS),
    USER_ITEM_AFFINITY: tuple(AFFINITY_COLUMNS),
    ITEM_CONTEXT: tuple(ITEM_COLUMNS),
}

# Which entity each view is keyed by.
VIEW_ENTITY = {VISITOR_PROFILE: "user", USER_ITEM_AFFINITY: "user", ITEM_CONTEXT: "item"}


def feature_objects(data: PreparedData) -> list[object]:
    """Entities and views of the repository, reading the prepared files of one home."""

    # Hashed categorical attributes of the visitor (4 columns of the logs). Profile
    # data: a purpose may use it only where its policy lists this view.
    visitor_profile = FeatureView(
        name=VISITOR_PROFILE,
        entities=[user],
        ttl=TTL[VISITOR_PROFILE],
        schema=[Field(name=name, dtype=String) for name in PROFILE_COLUMNS],
        source=FileSource(
            name="user_profile_source",
            path=str(data.user_profile),
            timestamp_field="event_timestamp",
        ),
        online=True,
        tags={"group": "profile"},
    )

    # The visitor's affinity to each of the 80 items (behavioural data derived from
    # their history): one field per item, `affinity_<item_id>`.
    user_item_affinity = FeatureView(
        name=USER_ITEM_AFFINITY,
        entities=[user],
        ttl=TTL[USER_ITEM_AFFINITY],
        schema=[Field(name=name, dtype=Float32) for name in AFFINITY_COLUMNS],
        source=FileSource(
            name="user_item_affinity_source",
            path=str(data.user_item_affinity),
            timestamp_field="event_timestamp",
        ),
        online=True,
        tags={"group": "affinity"},
    )

    # Item attributes: standardised price (item_feature_0) and three hashed
    # categorical attributes. No personal data.
    item_context = FeatureView(
        name=ITEM_CONTEXT,
        entities=[item],
        ttl=TTL[ITEM_CONTEXT],
        schema=[
            Field(name="item_feature_0", dtype=Float64),
            *[Field(name=name, dtype=String) for name in ITEM_COLUMNS[1:]],
        ],
        source=FileSource(
            name="item_context_source",
            path=str(data.item_context),
            timestamp_field="event_timestamp",
        ),
        online=True,
        tags={"group": "item"},
    )
    return [user, item, visitor_profile, user_item_affinity, item_context]
