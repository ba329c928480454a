"""Retrieval on the real server: the example's versions carry item embeddings distilled
from their rankers (`rankgate setup` trained them); with `retrieval.above_items: 0`
every request without candidates is retrieved for, so the example's 80 items stand
in for a large catalogue. Checked against the same server ranking every allowed
item (a request that names them all), with real faiss, Feast and Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.tables import load_catalogue, serving_files
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.observe.test_audit_http import wait_for
from tests.ranking.test_stages import PATIENT_BUDGET_MS
from tests.serving_support import deploy, health, ingress_user_config, user_with

PURPOSE, REGION = "onsite_personalization", "US"
SOURCES = [
    {"source": "ann", "quota": 24},
    {"source": "recent", "quota": 4},
    {"source": "popular", "quota": 4},
]


@pytest.fixture(scope="module")
def retrieving(server: Server) -> Iterator[None]:
    """The server retrieving for every request without candidates, the item table
    re-read every second; the default config afterwards."""
    user_config = ingress_user_config(
        retrieval={"above_items": 0, "sources": SOURCES}, features={"item_refresh_s": 1}
    )
    deploy(server, "retrieving", user_config, lambda h: h["retrieval"]["above_items"] == 0)
    yield
    deploy(server, "default", ingress_user_config(), lambda h: h["retrieval"]["above_items"] > 0)


def rank(server: Server, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{server.base_url}/v1/rank",
        json={"purpose": PURPOSE, "region": REGION, "budget_ms": PATIENT_BUDGET_MS, **body},
        headers=server.headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def recall_at_10(found: list[Any], exhaustive: list[dict[str, Any]]) -> float:
    """Share of the exhaustive top 10 that `found` holds; an item tied with the 10th
    counts as one of it."""
    score_of = {item["item_id"]: item["score"] for item in exhaustive}
    tenth = exhaustive[9]["score"]
    above = sum(item["score"] > tenth for item in exhaustive)
    got_above = sum(score_of[i] > tenth for i in found)
    got_tied = sum(score_of[i] == tenth for i in found)
    return (got_above + min(got_tied, 10 - above)) / 10


def test_every_version_has_an_item_index(server: Server, retrieving: None) -> None:
    indexes = health(server)["retrieval"]["indexes"]
    assert set(indexes) == {"v1", "v2"}
    assert all(i["items"] == 80 and i["embeddings"] == "distilled" for i in indexes.values())


def test_retrieval_then_ranking_finds_the_exhaustive_top_10(
    server: Server, retrieving: None, personalizable: list[str], env: Environment
) -> None:
    catalogue = load_catalogue(env.project, env.views(), env.data_dir)
    recalls, ids = [], []
    for user in personalizable[:40]:
        retrieved = rank(server, user_id=user, k=10)
        assert retrieved["fallback"] is None, retrieved["fallback"]
        assert retrieved["timings_ms"]["retrieve"] > 0
        exhaustive = rank(server, user_id=user, k=80, candidates=catalogue)
        assert exhaustive["timings_ms"]["retrieve"] == 0
        found = [item["item_id"] for item in retrieved["items"]]
        recalls.append(recall_at_10(found, exhaustive["items"]))
        ids.append(retrieved["request_id"])
    assert sum(recalls) / len(recalls) >= 0.9, recalls
    record = wait_for(env, ids[:1])[ids[0]]
    assert record.retrieved is not None and record.retrieved["ann"] == 24
    assert len(record.candidates) <= 32  # the rows the ranker scored: what was retrieved


def test_excluded_items_never_come_back_and_k_items_still_do(
    server: Server, retrieving: None, env: Environment
) -> None:
    user = user_with(env.consent, "email_marketing", ConsentState.GRANTED)
    body = rank(server, user_id=user, purpose="email_marketing", k=30)
    assert body["fallback"] is None and body["timings_ms"]["retrieve"] > 0
    shown = [item["item_id"] for item in body["items"]]
    assert len(shown) == 30 and not {70, 71, 72, 73} & set(shown)  # the email rule


def test_a_denied_person_is_not_retrieved_for(
    server: Server, retrieving: None, env: Environment
) -> None:
    user = user_with(env.consent, PURPOSE, ConsentState.DENIED)
    body = rank(server, user_id=user, k=5)
    assert body["fallback"]["reason"] == "no_consent"
    assert body["timings_ms"]["retrieve"] == 0 and body["timings_ms"]["features"] == 0
    record = wait_for(env, [body["request_id"]])[body["request_id"]]
    assert record.retrieved is None and record.features is None


def test_an_item_added_to_the_catalogue_is_found_without_a_restart(
    server: Server, retrieving: None, personalizable: list[str], env: Environment
) -> None:
    source = serving_files(env.project, env.views(), env.data_dir)["catalogue"]
    original = pq.read_table(source)
    user = personalizable[0]
    best = rank(server, user_id=user, k=1)["items"][0]["item_id"]
    frame = original.to_pandas()
    # A new item with the features of this person's best item: it ranks with it.
    row = frame[frame["item_id"] == best].tail(1).assign(item_id=1000)
    row["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    env.feast.write_to_online_store("item_context", row)
    pq.write_table(pd.concat([frame, row]).pipe(pa_table, original.schema), source)
    try:
        wait_for_items(server, 81)
        shown = [i["item_id"] for i in rank(server, user_id=user, k=10)["items"]]
        assert 1000 in shown and best in shown
        # Requests and events may name it too (the request rules follow the catalogue).
        assert rank(server, user_id=user, k=1, candidates=[1000])["items"][0]["item_id"] == 1000
        event = {"event_id": uuid.uuid4().hex, "type": "add_to_cart", "user_id": user}
        posted = httpx.post(
            f"{server.base_url}/v1/events",
            json={"events": [event | {"item_id": 1000, "timestamp": time.time()}]},
            headers=server.headers,
            timeout=10,
        )
        assert posted.status_code < 300, posted.text
    finally:
        pq.write_table(original, source)
    wait_for_items(server, 80)
    assert 1000 not in [i["item_id"] for i in rank(server, user_id=user, k=80)["items"]]


def pa_table(frame: pd.DataFrame, schema: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def wait_for_items(server: Server, count: int, timeout_s: float = 30) -> None:
    """Until the replica's index holds `count` items (requests trigger the refresh)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rank(server, user_id="refresh-probe", k=1)
        if health(server)["retrieval"]["indexes"]["v2"]["items"] == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"the index did not reach {count} items in {timeout_s} s")
