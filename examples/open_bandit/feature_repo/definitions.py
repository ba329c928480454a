"""Feast definitions of the Open Bandit example: three user views and one item view.

A plain Feast repository file: `feast apply` reads it, and so does rankgate. The
offline sources are the tables the example's prepare.py writes into the folder
named by RANKGATE_DATA_DIR (rankgate sets it to its home's data folder; for a
hand run, `eval "$(rankgate project env)"`).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float32, Float64, String

DATA = Path(os.environ.get("RANKGATE_DATA_DIR") or Path(__file__).parent / "data")

N_ITEMS = 80
PROFILE_COLUMNS = [f"user_feature_{i}" for i in range(4)]
AFFINITY_COLUMNS = [f"affinity_{i}" for i in range(N_ITEMS)]
ITEM_COLUMNS = [f"item_feature_{i}" for i in range(4)]
RECENT_CLICK_COLUMNS = [f"clicks_{i}" for i in range(N_ITEMS)]

# A person, known to the feature store only by their pseudonymous key: an HMAC of
# the application's user id (rankgate.core.pseudonym). The raw id never reaches Feast,
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

# Hashed categorical attributes of the visitor (4 columns of the logs). Profile
# data: a purpose may use it only where its policy lists this view.
visitor_profile = FeatureView(
    name="visitor_profile",
    entities=[user],
    ttl=timedelta(days=90),
    schema=[Field(name=name, dtype=String) for name in PROFILE_COLUMNS],
    source=FileSource(
        name="user_profile_source",
        path=str(DATA / "user_profile.parquet"),
        timestamp_field="event_timestamp",
    ),
    online=True,
    tags={"group": "profile"},
)

# The visitor's affinity to each of the 80 items (behavioural data derived from
# their history): one field per item, `affinity_<item_id>`.
user_item_affinity = FeatureView(
    name="user_item_affinity",
    entities=[user],
    ttl=timedelta(days=30),
    schema=[Field(name=name, dtype=Float32) for name in AFFINITY_COLUMNS],
    source=FileSource(
        name="user_item_affinity_source",
        path=str(DATA / "user_item_affinity.parquet"),
        timestamp_field="event_timestamp",
    ),
    online=True,
    tags={"group": "affinity"},
)

# Item attributes: standardised price (item_feature_0) and three hashed
# categorical attributes. No personal data.
item_context = FeatureView(
    name="item_context",
    entities=[item],
    ttl=timedelta(days=365),
    schema=[
        Field(name="item_feature_0", dtype=Float64),
        *[Field(name=name, dtype=String) for name in ITEM_COLUMNS[1:]],
    ],
    source=FileSource(
        name="item_context_source",
        path=str(DATA / "item_context.parquet"),
        timestamp_field="event_timestamp",
    ),
    online=True,
    tags={"group": "item"},
)

# The visitor's recent clicks per item (behavioural data): a decayed count, an event
# counting 1 when it happens and half as much an hour later (rankgate.yaml
# `streaming`). Its rows come only from the event stream: rankgate's consumer
# pushes each person's counts through the push source (`store.push`), and setup
# does not materialize it. The batch source behind the push source is what Feast
# needs for historical retrieval; prepare.py writes it empty.
recent_clicks_push = PushSource(
    name="recent_clicks_push",
    batch_source=FileSource(
        name="recent_clicks_source",
        path=str(DATA / "recent_clicks.parquet"),
        timestamp_field="event_timestamp",
    ),
)

recent_clicks = FeatureView(
    name="recent_clicks",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[Field(name=name, dtype=Float32) for name in RECENT_CLICK_COLUMNS],
    source=recent_clicks_push,
    online=True,
    tags={"group": "activity"},
)
