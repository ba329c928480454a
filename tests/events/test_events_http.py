"""Events over HTTP on the real server: accepted once durable, turned into streaming
features by the consumer deployment (Feast push), read by the next ranking.

The example project counts clicks per item in the streaming view `recent_clicks`;
its model v3 reads the person's recent clicks on each candidate item.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import httpx
import pytest

from features.streaming import CountState, row_time
from loadtests.ray_metrics import total
from rankgate.core import redis_keys
from rankgate.core.pseudonym import user_key
from rankgate.governance.api_keys import ApiKeyStore
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.events.consumer import GROUP
from serving.events.intake import stream_time
from tests.conftest import Server
from tests.serving_support import (
    PATIENT_BUDGET_MS,
    deploy,
    health,
    ingress_user_config,
    metrics_when,
    ray_metrics,
    replica_pids,
    routing,
    user_with,
)

STREAMING_VIEW = "recent_clicks"


def click(user_id: str, item_id: Any, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "type": "click",
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": time.time(),
        **extra,
    }


def post_events(server: Server, events: list[dict[str, Any]], headers=None) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        f"{server.base_url}/v1/events",
        json={"events": events},
        headers=headers or server.headers,
        timeout=10,
    )


def rank(server: Server, user_id: str, **extra: Any) -> dict[str, Any]:
    body = {"user_id": user_id, "purpose": "onsite_personalization", "region": "EU", "k": 80}
    response = httpx.post(
        f"{server.base_url}/v1/rank",
        json=body | {"budget_ms": PATIENT_BUDGET_MS} | extra,
        headers=server.headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def consumed(env: Environment, through: str, limit_s: float = 30.0) -> float:
    """Wait until the consumer group has read and acknowledged everything up to `through`."""
    stream = redis_keys.events(env.home.namespace)
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        groups = env.redis.xinfo_groups(stream)
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is not None:
            delivered = group["last-delivered-id"]
            delivered = delivered.decode() if isinstance(delivered, bytes) else delivered
            last = tuple(int(p) for p in delivered.split("-"))
            # Acknowledged through `through`: an older outcome still waiting for its
            # decision (serving/events/outcome_join.py, LATE_DECISION_S) may stay pending.
            waiting = env.redis.xpending_range(stream, GROUP, min=through, max="+", count=1)
            if last >= tuple(int(p) for p in through.split("-")) and not waiting:
                return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"the consumer did not get through {through} in {limit_s} s")


@pytest.fixture(scope="module")
def streaming_server(server: Server) -> Server:
    """The server with v3 (which reads recent_clicks) as its stable version."""
    deploy(
        server,
        "v3-stable",
        ingress_user_config(routing=routing("v3", alternate=["v1"])),
        lambda h: "v3" in h["models"]["loaded"] and h["routing"]["versions"][0]["version"] == "v3",
    )
    return server


@pytest.fixture(scope="module", autouse=True)
def back_to_default(server: Server):  # type: ignore[no-untyped-def]
    yield
    deploy(
        server,
        "default",
        ingress_user_config(),
        lambda h: h["routing"]["versions"][0]["version"] == "v2",
    )


def test_a_click_changes_the_next_ranking_through_the_streaming_feature(
    streaming_server: Server,
) -> None:
    server = streaming_server
    env = Environment.open()
    user = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=3)
    before = rank(server, user)
    assert before["model"]["version"] == "v3" and before["fallback"] is None
    assert "freshness" not in before  # no events of this person yet
    ranks = {item["item_id"]: item for item in before["items"]}
    # The item ranked last: three recent clicks on it must lift it.
    target = before["items"][-1]["item_id"]
    posted = post_events(server, [click(user, target, region="EU") for _ in range(3)])
    assert posted.status_code == 202, posted.text
    accepted = posted.json()
    assert accepted["accepted"] == 3 and accepted["duplicates"] == 0
    newest = max(accepted["stream_ids"], key=lambda s: tuple(int(p) for p in s.split("-")))
    accepted_at = stream_time(newest)
    deadline = time.monotonic() + 20
    while True:
        after = rank(server, user)
        fresh = after.get("freshness")
        if fresh is not None and fresh["events_through"] >= accepted_at:
            break
        assert time.monotonic() < deadline, f"no ranking included the clicks: {after}"
        time.sleep(0.02)
    moved = {item["item_id"]: item for item in after["items"]}
    print(
        f"item {target}: rank {ranks[target]['rank']} -> {moved[target]['rank']}, score "
        f"{ranks[target]['score']} -> {moved[target]['score']}; "
        f"event age at the first decision that included it: {fresh['event_age_ms']} ms"
    )
    assert moved[target]["score"] > ranks[target]["score"]
    assert moved[target]["rank"] < ranks[target]["rank"]
    # Other items' scores did not move: only the clicked item's feature changed.
    others = [i for i in ranks if i != target]
    assert all(moved[i]["score"] == pytest.approx(ranks[i]["score"]) for i in others)
    # The decision's audit record says how fresh its streaming features were.
    time.sleep(0.3)
    entries = env.redis.xrevrange(redis_keys.audit(env.home.namespace), count=50)
    records = [e[1][b"record"].decode() for e in entries]
    assert any(after["request_id"] in r and '"events_through"' in r for r in records)
    # The ingress timed the event into a decision; the consumer applied it to the view.
    fed = ("rankgate_event_to_decision_seconds_count", {})
    applied = ("rankgate_streaming_events_applied_total", {"view": "recent_clicks"})
    metrics = metrics_when(
        server, lambda s: all(total(s, n, **labels) for n, labels in (fed, applied))
    )
    assert total(metrics, fed[0]) >= 1
    assert total(metrics, applied[0], **applied[1]) >= 1


def test_events_of_people_who_may_not_be_personalized_are_not_features(
    streaming_server: Server,
) -> None:
    server = streaming_server
    env = Environment.open()
    denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    unused = {"view": STREAMING_VIEW, "reason": "not_permitted"}
    name = "rankgate_streaming_events_unused_total"
    before = total(ray_metrics(server), name, **unused)
    posted = post_events(server, [click(denied, 1, region="US"), click(denied, 2)])
    assert posted.status_code == 202
    consumed(env, max(posted.json()["stream_ids"]))
    state = redis_keys.streaming_state(env.home.namespace, STREAMING_VIEW, user_key(denied))
    assert not env.redis.exists(state)
    # Counted as unused, both (the consumer's own series, through Ray's metrics).
    metrics = metrics_when(server, lambda s: total(s, name, **unused) - before >= 2)
    assert total(metrics, name, **unused) - before == 2


def test_killing_the_consumer_mid_stream_loses_no_event(streaming_server: Server) -> None:
    server = streaming_server
    env = Environment.open()
    people = [
        user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=n)
        for n in range(10, 30)
    ]
    # Start these people from no counts, and send every event at one instant: each
    # count must then be exactly the number of events sent.
    for person in people:
        env.redis.delete(
            redis_keys.streaming_state(env.home.namespace, STREAMING_VIEW, user_key(person))
        )
    at = time.time()
    sent: dict[str, int] = dict.fromkeys(people, 0)
    before = replica_pids(server.home, "EventConsumer")
    assert len(before) == 1, before
    last = ""
    killed = False
    for batch in range(40):
        events = []
        for n in range(50):
            person = people[(batch * 50 + n) % len(people)]
            events.append(click(person, 7, timestamp=at, region="EU"))
            sent[person] += 1
        response = post_events(server, events)
        assert response.status_code == 202, response.text
        last = max(response.json()["stream_ids"])
        if batch == 10:
            os.kill(before[0], signal.SIGKILL)
            killed = True
    assert killed
    took = consumed(env, last, limit_s=90)
    after = replica_pids(server.home, "EventConsumer")
    assert after and after != before
    counted, pushed = {}, {}
    for person in people:
        raw = env.redis.hgetall(
            redis_keys.streaming_state(env.home.namespace, STREAMING_VIEW, user_key(person))
        )
        state = CountState.read(raw)
        counted[person] = state.counts.get("clicks_7", 0.0)
        # The row holds the count decayed from the events' time to its own.
        as_of = row_time(state.through or "0-0").timestamp()
        pushed[person] = counted[person] * 0.5 ** ((as_of - state.at) / 3600)
    # Feature rows out: what Feast serves for each person.
    store = env.feast
    rows = store.get_online_features(
        features=[f"{STREAMING_VIEW}:clicks_7"],
        entity_rows=[{env.project.spec.user.join_key: user_key(p)} for p in people],
    ).to_dict()["clicks_7"]
    print(
        f"consumer killed after 11 of 40 batches; {sum(sent.values())} events in, "
        f"{sum(counted.values()):g} counted, all acknowledged {took:.1f} s after the last 202"
    )
    # None lost, none counted twice, and Feast serves exactly that.
    assert counted == {p: float(n) for p, n in sent.items()}
    assert [float(v) for v in rows] == [pytest.approx(pushed[p], rel=1e-6) for p in people]
    assert sum(sent.values()) == 2000


def test_bad_events_are_refused_with_their_field_and_change_nothing(server: Server) -> None:
    env = Environment.open()
    stream = redis_keys.events(env.home.namespace)
    length = env.redis.xlen(stream)
    user = "bad-input-user"
    cases = [
        ([click(user, 1) | {"type": "teleport"}], "events.0.type"),
        ([{k: v for k, v in click(user, 1).items() if k != "item_id"}], "events.0.item_id"),
        ([click(user, 1) | {"timestamp": time.time() + 86400}], "events.0.timestamp"),
        ([click(user, n) for n in range(201)], "events"),
        ([click(user, 1), click(user, 99_999)], "events.1.item_id"),
    ]
    for events, field in cases:
        response = post_events(server, events)
        assert response.status_code in (413, 422), (field, response.text)
        if response.status_code == 422:
            assert field in {p["field"] for p in response.json()["problems"]}, response.text
    assert env.redis.xlen(stream) == length  # nothing half-written
    # A key without the events scope is refused; an unknown request id is accepted.
    purposes = ["onsite_personalization"]
    plain = ApiKeyStore(env.redis, env.home.namespace).create("no-events", purposes, purposes)
    refused = post_events(server, [click(user, 1)], {"Authorization": f"Bearer {plain}"})
    assert refused.status_code == 403 and "events" in refused.json()["detail"]
    unknown = post_events(server, [click(user, 1, request_id="never-made")])
    assert unknown.status_code == 202
    again = post_events(
        server, [dict(click(user, 1), event_id="same-id"), dict(click(user, 2), event_id="other")]
    )
    repeat = post_events(server, [dict(click(user, 1), event_id="same-id")])
    assert again.json()["accepted"] == 2
    assert repeat.json() == {"accepted": 0, "duplicates": 1, "stream_ids": [None]}
    assert health(server)["status"] == "ok"
