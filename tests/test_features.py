"""The example's Feast repository on the real embedded Redis, and training/serving
parity of the feature vectors built from a model's declaration."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from features.spec import load_features_file, resolve
from features.vector import ItemTable, build_matrix, hash_code, user_fields
from model_store.train import load_item_table, training_set
from rankgate.pseudonym import user_key
from rankgate.settings import get_project
from rankgate.setup import Environment
from tests.serving_support import example_user_ids


def v2_specs(env: Environment):  # type: ignore[no-untyped-def]
    project = env.project
    return resolve(
        load_features_file(project.path("models/v2.yaml")).inputs, env.view_infos(), project
    )


def test_the_repository_is_read_from_the_project_with_its_ttls(env: Environment) -> None:
    infos = env.view_infos()
    assert {name: (info.entity, len(info.fields)) for name, info in infos.items()} == {
        "visitor_profile": ("user", 4),
        "user_item_affinity": ("user", 80),
        "item_context": ("item", 4),
    }
    ttl = {view.name: view.ttl for view in env.feast.list_feature_views()}
    assert ttl["user_item_affinity"] == timedelta(days=30)
    # The registry is the home's; the Feast project is the home's namespace.
    assert env.feast.project == env.home.namespace


def test_online_features_match_the_training_rows(env: Environment) -> None:
    """The online read + builder gives the very rows the model was trained on."""
    specs = v2_specs(env)
    uid = example_user_ids()[3]
    fields = user_fields(specs, env.view_infos())
    refs = [f"{view}:{name}" for view, names in fields.items() for name in names]
    online = env.feast.get_online_features(features=refs, entity_rows=[{"user_key": user_key(uid)}])
    user = {k: v[0] for k, v in online.to_dict().items()}
    item_rows = env.feast.get_online_features(
        features=[f"item_context:item_feature_{i}" for i in range(4)],
        entity_rows=[{"item_id": i} for i in env.catalogue()],
    ).to_dict()
    online_items = ItemTable(
        {
            iid: {f"item_feature_{i}": item_rows[f"item_feature_{i}"][n] for i in range(4)}
            for n, iid in enumerate(item_rows["item_id"])
        }
    )
    impressions = (
        pd.read_parquet(env.data_dir / "impressions.parquet")
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )
    mine = impressions.index[impressions["user_key"] == user_key(uid)].to_numpy()
    dataset = training_set(env.project, env.views(), env.data_dir, specs)
    served = build_matrix(specs, user, online_items, impressions.loc[mine, "item_id"].tolist())
    np.testing.assert_array_equal(served, dataset.matrix[mine])
    # And the offline item table equals the online one, column by column.
    offline = load_item_table(env.project, env.views())
    assert offline.item_ids == online_items.item_ids
    for spec in specs:
        if spec.source == "item":
            np.testing.assert_array_equal(
                offline.column(spec.field, spec.encoding),
                online_items.column(spec.field, spec.encoding),
            )


def test_encodings_are_the_documented_ones() -> None:
    import hashlib

    items = ItemTable({"a": {"price": 1.5, "colour": "red"}, "b": {"price": None}})
    assert items.column("price", "number").tolist() == [1.5, -1.0]
    red = float(int(hashlib.sha256(b"red").hexdigest()[:5], 16))
    assert hash_code("red") == red
    assert items.column("colour", "hash").tolist() == [red, -1.0]


def test_unknown_user_reads_as_missing(env: Environment) -> None:
    online = env.feast.get_online_features(
        features=["visitor_profile:user_feature_0"],
        entity_rows=[{"user_key": user_key("u-nobody")}],
    ).to_dict()
    assert online["user_feature_0"] == [None]


def test_feature_timestamps_are_the_preparation_time(env: Environment) -> None:
    prepared = pd.read_parquet(env.data_dir / "user_item_affinity.parquet")
    snapshot = pd.Timestamp(prepared["event_timestamp"].iloc[0])
    online = env.feast.get_online_features(
        features=["user_item_affinity:affinity_0"],
        entity_rows=[{"user_key": user_key(example_user_ids()[0])}],
    ).to_dict(include_event_timestamps=True)
    assert online["affinity_0__ts"][0] == int(snapshot.timestamp())
    assert get_project().name == "open_bandit"
