"""Feast repository on the real embedded Redis, and training/serving parity of features."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.definitions import TTL, VIEW_FIELDS
from features.vector import ALL_FEATURE_NAMES, build_matrix, resolve, user_fields
from model_store.train import load_item_table, training_set
from rankgate.example_data import example_user_ids, load_impressions
from rankgate.pseudonym import user_key
from rankgate.setup import Environment


def test_repository_defines_three_views_with_ttls(env: Environment) -> None:
    views = env.feature_views()
    assert views is not None
    assert {name: len(fields) for name, fields in views.items()} == {
        name: len(fields) for name, fields in VIEW_FIELDS.items()
    }
    for view in env.feast.list_feature_views():
        assert view.ttl == TTL[view.name]


def test_online_features_match_the_training_rows(env: Environment) -> None:
    """The online read + builder gives the very rows the model was trained on."""
    specs = resolve(ALL_FEATURE_NAMES)
    uid = example_user_ids()[3]
    refs = [f"{view}:{name}" for view, names in user_fields(specs).items() for name in names]
    online = env.feast.get_online_features(features=refs, entity_rows=[{"user_key": user_key(uid)}])
    user = {k: v[0] for k, v in online.to_dict().items()}
    item_rows = env.feast.get_online_features(
        features=[f"item_context:item_feature_{i}" for i in range(4)],
        entity_rows=[{"item_id": i} for i in range(80)],
    ).to_dict()
    from features.vector import ItemTable

    online_items = ItemTable(
        {
            iid: {f"item_feature_{i}": item_rows[f"item_feature_{i}"][n] for i in range(4)}
            for n, iid in enumerate(item_rows["item_id"])
        }
    )
    impressions = load_impressions().sort_values("timestamp", kind="stable").reset_index(drop=True)
    mine = impressions.index[impressions["user_id"] == uid].to_numpy()
    dataset = training_set(env.data, specs)
    served = build_matrix(specs, user, online_items, impressions.loc[mine, "item_id"].tolist())
    np.testing.assert_array_equal(served, dataset.matrix[mine])
    # And the offline item table equals the online one.
    np.testing.assert_array_equal(load_item_table(env.data).values, online_items.values)


def test_unknown_user_reads_as_missing(env: Environment) -> None:
    online = env.feast.get_online_features(
        features=["visitor_profile:user_feature_0"],
        entity_rows=[{"user_key": user_key("u-nobody")}],
    ).to_dict()
    assert online["user_feature_0"] == [None]


def test_feature_timestamps_are_the_snapshot_time(env: Environment) -> None:
    import json

    snapshot = pd.Timestamp(json.loads(env.data.marker.read_text())["snapshot_time"])
    online = env.feast.get_online_features(
        features=["user_item_affinity:affinity_0"],
        entity_rows=[{"user_key": user_key(example_user_ids()[0])}],
    ).to_dict(include_event_timestamps=True)
    assert online["affinity_0__ts"][0] == int(snapshot.timestamp())
