"""The example's Feast repository on the real embedded Redis, and training/serving
parity of the feature vectors built from a model's declaration."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from features.spec import load_features_file, resolve
from features.vector import ItemTable, build_matrix, hash_code, user_fields
from model_store.logged import load_item_table, training_set
from rankgate.core.pseudonym import user_key
from rankgate.core.settings import get_project
from rankgate.ops.environment import Environment
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
        "recent_clicks": ("user", 80),
        "item_context": ("item", 4),
    }
    ttl = {view.name: view.ttl for view in env.feast.list_feature_views()}
    assert ttl["user_item_affinity"] == timedelta(days=30)
    assert ttl["recent_clicks"] == timedelta(days=2)
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


def test_the_fetcher_reads_what_feast_reads(env: Environment) -> None:
    """The request path's one HMGET per person gives Feast's own values, and an
    unknown person reads as missing in every view."""
    import asyncio

    from serving.ranking.feature_fetch import FeatureFetcher

    fetcher = FeatureFetcher(env.feast, env.project, env.data_dir)
    fields = user_fields(v2_specs(env), env.view_infos())
    uid = example_user_ids()[3]

    people = example_user_ids()[:12]

    async def read() -> tuple[Any, Any, list[Any]]:
        known = await fetcher.fetch_user(user_key(uid), fields)
        nobody = await fetcher.fetch_user(user_key("u-nobody"), fields)
        return known, nobody, [await fetcher.fetch_user(user_key(u), fields) for u in people]

    known, nobody, everyone = asyncio.run(read())
    refs = [f"{view}:{name}" for view, names in fields.items() for name in names]
    online = env.feast.get_online_features(features=refs, entity_rows=[{"user_key": user_key(uid)}])
    expected = {k: v[0] for k, v in online.to_dict().items() if k != "user_key"}
    assert known.values == expected and len(expected) == sum(map(len, fields.values()))
    assert not known.missing_views and set(known.age_s) == set(fields)
    assert sorted(nobody.missing_views) == sorted(fields) and nobody.values == {}
    # Values come from the fetcher's cache once seen: still Feast's, person by person.
    assert fetcher.values.values, "the reads filled the value cache"
    rows = env.feast.get_online_features(
        features=refs, entity_rows=[{"user_key": user_key(u)} for u in people]
    ).to_dict()
    for n, features in enumerate(everyone):
        assert features.values == {k: v[n] for k, v in rows.items() if k != "user_key"}


def test_a_person_s_redis_key_is_feast_s(env: Environment) -> None:
    from serving.ranking.feature_fetch import FeatureFetcher

    keys = FeatureFetcher(env.feast, env.project, env.data_dir).user_keys
    assert keys.joined, "the joined layout matched Feast's probe"
    for key in [user_key(u) for u in example_user_ids()[:5]] + ["", "é-ü-∑", "x" * 300]:
        assert keys.of(key) == keys.from_feast(key)


def test_the_value_cache_keeps_only_scalars_and_only_up_to_its_limit() -> None:
    from feast.protos.feast.types.Value_pb2 import DoubleList, Value

    from serving.ranking.feature_fetch import ValueCache

    cache = ValueCache(limit=2)
    one, two, three = (Value(double_val=x).SerializeToString() for x in (1.5, 2.5, 3.5))
    listed = Value(double_list_val=DoubleList(val=[1.0, 2.0])).SerializeToString()
    assert cache.value(None) is None and cache.value(b"") is None
    assert cache.value(listed) == [1.0, 2.0] and cache.values == {}
    assert [cache.value(one), cache.value(two), cache.value(three)] == [1.5, 2.5, 3.5]
    assert cache.values == {one: 1.5, two: 2.5}  # full: the third is decoded, not kept
    assert cache.value(three) == 3.5 and cache.value(one) == 1.5


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


# -- streaming views: not materialized; in training, their value point in time ----


def test_setup_does_not_materialize_the_streaming_view(env: Environment) -> None:
    """recent_clicks' online rows come only from the event stream: after setup, a
    person's Feast row holds the other user views and not it."""
    from rankgate.core import redis_keys
    from rankgate.governance.identity import LINK_FIELD
    from rankgate.ops.erasure import feast_user_key
    from serving.events.intake import StoredEvent

    # Someone the event stream never heard of (other tests post events for some).
    stream = redis_keys.events(env.home.namespace)
    posted = {
        StoredEvent.read(i, e).user_key
        for i, e in env.redis.xrange(stream)
        if LINK_FIELD not in e  # a link of ids (tests/events/test_identity_http.py)
    }
    key = next(k for k in map(user_key, example_user_ids()) if k not in posted)
    rows = [
        name
        for name in env.redis.scan_iter(match=f"*{key}*", count=1000)
        if feast_user_key(name, env.home.namespace, "user_key") == key
    ]
    views = {f[4:] for name in rows for f in env.redis.hkeys(name) if f.startswith(b"_ts:")}
    assert views == {b"visitor_profile", b"user_item_affinity"}


HOUR = 3600.0


def history_log(rows: list[tuple[str, int, float, int]]) -> pd.DataFrame:
    """A log in the example's columns: (user key, item, seconds after t0, click)."""
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    frame = pd.DataFrame(rows, columns=["user_key", "item_id", "seconds", "click"])
    frame["timestamp"] = t0 + pd.to_timedelta(frame["seconds"], unit="s")
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def test_a_streaming_value_is_the_decayed_count_of_earlier_clicks() -> None:
    from features.history import values_at_impressions

    project = get_project()
    view = project.streaming["recent_clicks"].model_copy(update={"default": -7.0})
    logs = history_log(
        [
            ("a", 1, 0.0, 1),  # a clicks item 1
            ("a", 1, 0.0, 0),  # the same instant: the click is not yet known
            ("a", 1, HOUR, 1),  # an hour later: half a click; then a second click
            ("a", 2, HOUR, 0),  # another item of a person with a row: 0
            ("b", 1, 2 * HOUR, 0),  # b never clicked: no row, the default
            ("a", 1, 3 * HOUR, 0),  # 0.5 * 0.25 + 1 * 0.25
            ("a", 1, 3 * HOUR + 3 * 24 * HOUR, 0),  # 3 days after a's last click: past the TTL
        ]
    )
    items = logs["item_id"].tolist()
    wanted = [[f"clicks_{i}"] for i in items]
    ttl = timedelta(days=2).total_seconds()

    def read(view: Any) -> list[float]:
        values = values_at_impressions(project, view, ttl, logs, items, wanted)
        return [v[f"clicks_{i}"] for v, i in zip(values, items, strict=True)]

    assert read(view) == [-7.0, -7.0, 0.5, 0.0, -7.0, 0.375, -7.0]
    # per: total counts every item's clicks in one field.
    total = view.model_copy(update={"per": "total", "field": "clicks"})
    values = values_at_impressions(project, total, ttl, logs, items, [["clicks"]] * len(logs))
    assert [v["clicks"] for v in values] == [-7.0, -7.0, 0.5, 0.5, -7.0, 0.375, -7.0]
    # A view that counts impressions counts every logged row.
    assert read(view.model_copy(update={"events": ["impression"]})) == [
        -7.0,
        -7.0,
        1.0,
        0.0,
        -7.0,
        0.5,
        -7.0,
    ]
    # Events the log does not record (the project's own add_to_cart): always the default.
    assert set(read(view.model_copy(update={"events": ["add_to_cart"]}))) == {-7.0}


def test_v3_trains_on_recent_clicks_as_serving_would_have_read_them(env: Environment) -> None:
    """The training matrix of v3 is v2's plus one column: for each impression, the
    person's earlier clicks on that item, each halved per hour since, computed here
    independently (quadratic, from the log)."""
    project = env.project
    specs = {
        version: resolve(
            load_features_file(project.path(f"models/{version}.yaml")).inputs,
            env.view_infos(),
            project,
        )
        for version in ("v2", "v3")
    }
    v2 = training_set(project, env.views(), env.data_dir, specs["v2"]).matrix
    v3 = training_set(project, env.views(), env.data_dir, specs["v3"]).matrix
    np.testing.assert_array_equal(v3[:, :-1], v2)
    logs = (
        pd.read_parquet(env.data_dir / "impressions.parquet")
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )
    seconds = logs["timestamp"].astype("int64").to_numpy() / 1e9
    clicks = logs[logs["click"] == 1]
    ttl = timedelta(days=2).total_seconds()
    expected = np.zeros(len(logs))
    for pos, row in logs.iterrows():
        mine = clicks[(clicks["user_key"] == row["user_key"])]
        earlier = seconds[mine.index] < seconds[pos]
        recent = earlier & (seconds[pos] - seconds[mine.index] <= ttl)
        if not recent.any():
            continue  # no row within the TTL: the default, 0
        same = (mine["item_id"] == row["item_id"]).to_numpy() & earlier
        expected[pos] = np.sum(0.5 ** ((seconds[pos] - seconds[mine.index][same]) / HOUR))
    np.testing.assert_allclose(v3[:, -1], expected, rtol=1e-6, atol=1e-12)
    assert (v3[:, -1] > 0).sum() > 10  # the sample has people who click again


def row_user(logged: Any, row: int, specs: Any) -> dict[str, Any]:
    """What serving would have read of the person of log row `row`: their offline rows
    (one per person in the example) and each streaming input at the row's time, by
    the per-row reference (`values_at_impressions`)."""
    from features.history import values_at_impressions
    from model_store.logged import latest_rows

    key = logged.logs[logged.user_column].iloc[row]
    user: dict[str, Any] = {}
    for name in logged.users:
        view = next(v for v in logged.project_views if v.name == name)
        rows = latest_rows(view, logged.project, logged.project.spec.user.join_key)
        if key in rows.index:
            user.update(rows.loc[key].to_dict())
    for spec in specs:
        if spec.view in logged.streaming:
            view = logged.project.streaming[spec.view]
            name = spec.field_for(logged.item_ids[row]) if spec.per_item else spec.field
            wanted = [[name] if n == row else [] for n in range(len(logged.logs))]
            values = values_at_impressions(
                logged.project,
                view,
                logged.streaming[spec.view].ttl_s,
                logged.logs,
                list(logged.item_ids),
                wanted,
            )
            user[name] = values[row][name]
    return user


def test_the_log_matrix_is_build_matrix_row_by_row(env: Environment) -> None:
    """For each example model (v3 reads the streaming view, v2 a field per item), the
    column-by-column training matrix equals `build_matrix` of sampled rows, bit for bit."""
    from model_store.logged import LoggedRows

    project, views = env.project, env.views()
    rng = np.random.default_rng(5)
    for version in ("v1", "v2", "v3"):
        specs = resolve(
            load_features_file(project.path(f"models/{version}.yaml")).inputs,
            env.view_infos(),
            project,
        )
        logged = LoggedRows.read(project, views, env.data_dir, specs)
        logged.project_views = views  # type: ignore[attr-defined]
        matrix = logged.matrix(specs)
        for row in rng.choice(len(logged.logs), 25, replace=False):
            context = {c: logged.logs[c].iloc[row] for c in logged.contexts}
            expected = build_matrix(
                specs, row_user(logged, row, specs), logged.items, [logged.item_ids[row]], context
            )
            np.testing.assert_array_equal(matrix[row : row + 1], expected, err_msg=version)


def test_a_user_view_with_history_is_joined_as_of_each_impression() -> None:
    """A person's newest row at or before the impression; before their first row, that
    first row (a snapshot source); a person without rows: missing."""
    from features.offline import UserRows

    t = pd.Timestamp("2026-01-01", tz="UTC")
    frame = pd.DataFrame(
        {
            "key": ["a", "b", "a", "a"],
            "at": [t, t, t + pd.Timedelta(days=2), t + pd.Timedelta(days=5)],
            "tier": [1, 7, 2, 3],
        }
    )
    rows = UserRows.of(frame, "key", "at")
    days = [-1, 0, 1, 2, 4, 5, 9, 3]
    keys = ["a", "a", "a", "a", "a", "a", "a", "c"]
    times = np.array([(t + pd.Timedelta(days=d)).value for d in days], dtype=np.int64)
    at = rows.positions(np.array(keys, dtype=object), times)
    tiers = [None if p < 0 else int(rows.frame["tier"].iloc[p]) for p in at]
    assert tiers == [1, 1, 1, 2, 2, 3, 3, None]
    # Without times (a log without a time column): the oldest row.
    assert rows.frame["tier"].iloc[rows.positions(np.array(["a"], dtype=object), None)[0]] == 1


def test_the_export_is_what_serving_builds(env: Environment, tmp_path: Any) -> None:
    """`rankgate features export`: per logged impression, the vector the online read
    (Feast, Redis) and `build_matrix` give for that person and item, bit for bit."""
    from click.testing import CliRunner

    from rankgate.cli.main import main as cli

    out = tmp_path / "v2.parquet"
    result = CliRunner().invoke(cli, ["features", "export", str(out), "--model", "v2"])
    assert result.exit_code == 0, result.output
    exported = pd.read_parquet(out)
    specs = v2_specs(env)
    names = [s.name for s in specs]
    assert list(exported.columns) == [
        "user_key",
        "item_id",
        "timestamp",
        "click",
        "position",
        "propensity_score",
        *names,
    ]
    log = pd.read_parquet(env.data_dir / "impressions.parquet")
    assert len(exported) == len(log) and exported["click"].sum() == log["click"].sum()
    catalogue = env.catalogue()
    item_rows = env.feast.get_online_features(
        features=[f"item_context:item_feature_{i}" for i in range(4)],
        entity_rows=[{"item_id": i} for i in catalogue],
    ).to_dict()
    online_items = ItemTable(
        {
            iid: {f"item_feature_{i}": item_rows[f"item_feature_{i}"][n] for i in range(4)}
            for n, iid in enumerate(item_rows["item_id"])
        }
    )
    fields = user_fields(specs, env.view_infos())
    refs = [f"{view}:{name}" for view, names in fields.items() for name in names]
    for uid in example_user_ids()[:4]:
        online = env.feast.get_online_features(
            features=refs, entity_rows=[{"user_key": user_key(uid)}]
        )
        user = {k: v[0] for k, v in online.to_dict().items()}
        mine = exported[exported["user_key"] == user_key(uid)]
        assert len(mine)
        served = build_matrix(specs, user, online_items, mine["item_id"].tolist())
        np.testing.assert_array_equal(served, mine[names].to_numpy(dtype=np.float32))
    # A bad choice is refused, naming the option; nothing is written.
    refused = CliRunner().invoke(
        cli, ["features", "export", str(tmp_path / "x.parquet"), "--model", "nope"]
    )
    assert refused.exit_code != 0 and "--model" in refused.output
    assert not (tmp_path / "x.parquet").exists()
