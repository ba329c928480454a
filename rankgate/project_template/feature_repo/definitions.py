"""Feast definitions of the project: who is ranked (users), what is ranked (items),
and the feature views a model may read about each.

This is a plain Feast repository file: `feast apply` reads it, and so does
rankgate (`rankgate project check`, `rankgate setup`). rankgate.yaml names the
entities and the item view below; models name fields as `view:field`.

The offline sources are Parquet files in the folder RANKGATE_DATA_DIR names (the
rankgate home's data folder, where prepare.py writes them); without it, the
data/ folder beside this file.
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64, String

DATA = Path(os.environ.get("RANKGATE_DATA_DIR") or Path(__file__).parent / "data")

# A person, known to the feature store only by their pseudonymous key: an HMAC of
# your application's user id (rankgate.core.pseudonym.user_key), a string. Write that
# key, never the raw id, into the user tables: what Feast stores ends up in Redis.
shopper = Entity(
    name="shopper",
    join_keys=["shopper_key"],
    value_type=ValueType.STRING,
    description="A person, keyed by the HMAC of their user id.",
)

# An item of the catalogue. Its value type must match rankgate.yaml's item.id_type
# (INT64 for int ids, STRING for string ids).
product = Entity(
    name="product",
    join_keys=["product_id"],
    value_type=ValueType.INT64,
    description="A catalogue item.",
)

# What is known about the person: a feature view keyed by the user entity. Its rows
# are copied into Redis by materialization and read per request. A purpose of
# policies/policy.yaml may use it only where it lists this view. The TTL says how
# old a row may be before Feast treats it as missing.
shopper_profile = FeatureView(
    name="shopper_profile",
    entities=[shopper],
    ttl=timedelta(days=90),
    schema=[
        Field(name="segment", dtype=String, description="Customer segment."),
        Field(name="visits_30d", dtype=Int64, description="Visits in the last 30 days."),
    ],
    source=FileSource(
        name="shopper_profile_source",
        path=str(DATA / "shopper_profile.parquet"),
        timestamp_field="updated_at",
    ),
    online=True,
    tags={"group": "profile"},
)

# Item attributes: a feature view keyed by the item entity (rankgate.yaml's
# item_view). Serving replicas hold it whole in memory; its source's rows are also
# the catalogue (rankgate.yaml `catalogue: {view: item_attributes}`).
item_attributes = FeatureView(
    name="item_attributes",
    entities=[product],
    ttl=timedelta(days=365),
    schema=[
        Field(name="category", dtype=String, description="Product category."),
        Field(name="price", dtype=Float64, description="Price in the shop's currency."),
    ],
    source=FileSource(
        name="item_attributes_source",
        path=str(DATA / "item_attributes.parquet"),
        timestamp_field="updated_at",
    ),
    online=True,
    tags={"group": "item"},
)
