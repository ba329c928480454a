"""Linked ids over HTTP on the real server: an anonymous visitor's clicks and consent
follow them when they sign in (`POST /v1/identify`), a denial is never lost by a
link, outcomes join across ids, and forgetting one id forgets them all.

The example's model v3 reads the person's recent clicks on each item (the streaming
view `recent_clicks`); EU is an opt-in region, so a visitor's clicks become
features only with a recorded grant, given here under the anonymous id.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from features.streaming import CountState
from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.pseudonym import user_key
from rankgate.governance.consent import ConsentState
from rankgate.governance.identity import IdKind, id_key
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.events.test_events_http import (  # noqa: F401 - module fixtures used here
    STREAMING_VIEW,
    back_to_default,
    click,
    consumed,
    post_events,
    streaming_server,
)
from tests.redis_contents import places_holding
from tests.serving_support import PATIENT_BUDGET_MS, user_with

PURPOSE = "onsite_personalization"


def call(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers, timeout=10)


def rank_as(server: Server, **ids: str) -> dict[str, Any]:
    body = {"purpose": PURPOSE, "region": "EU", "k": 80, "budget_ms": PATIENT_BUDGET_MS}
    response = call(server, "/v1/rank", body | ids)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def anonymous_click(visitor: str, item_id: Any, **extra: Any) -> dict[str, Any]:
    event = click("unused", item_id, region="EU", **extra)
    del event["user_id"]
    return event | {"anonymous_id": visitor}


def grant(server: Server, granted: bool, **ids: str) -> None:
    body = {"purposes": {PURPOSE: granted}, "source": "banner"} | ids
    response = call(server, "/v1/consent", body)
    assert response.status_code == 200, response.text


def newest(stream_ids: list[str]) -> str:
    return max(stream_ids, key=lambda s: tuple(int(p) for p in s.split("-")))


@pytest.mark.usefixtures("streaming_server")
def test_an_anonymous_visitors_clicks_count_once_they_sign_in(server: Server) -> None:
    env = Environment.open()
    person = user_with(env.consent, PURPOSE, ConsentState.GRANTED, skip=60)
    visitor = f"cookie-{uuid.uuid4().hex}"
    before = rank_as(server, user_id=person)
    assert before["model"]["version"] == "v3" and before["fallback"] is None
    target = before["items"][-1]["item_id"]
    grant(server, True, anonymous_id=visitor)
    posted = post_events(server, [anonymous_click(visitor, target) for _ in range(3)])
    assert posted.status_code == 202, posted.text
    consumed(env, newest(posted.json()["stream_ids"]))
    namespace, visitor_key = env.home.namespace, id_key(IdKind.ANONYMOUS, visitor)
    assert env.redis.exists(redis_keys.streaming_state(namespace, STREAMING_VIEW, visitor_key))
    # Signed in: nothing of the visitor counts for the person yet.
    assert rank_as(server, user_id=person)["items"] == before["items"]

    linked = call(
        server, "/v1/identify", {"user_id": person, "anonymous_ids": [visitor], "region": "EU"}
    )
    assert linked.status_code == 200, linked.text
    assert linked.json() == {
        "linked": ["anonymous_ids.0"],
        "already_linked": [],
        "ids": 2,
        "consent_merged": 1,  # the visitor's grant is the later of two grants
    }
    deadline = time.monotonic() + 20
    while True:
        after = rank_as(server, user_id=person)
        moved = {item["item_id"]: item for item in after["items"]}
        if moved[target]["rank"] < len(after["items"]):
            break
        assert time.monotonic() < deadline, "the visitor's clicks never reached the person"
        time.sleep(0.05)
    was = {item["item_id"]: item for item in before["items"]}[target]
    print(f"item {target}: rank {was['rank']} -> {moved[target]['rank']} after signing in")
    assert moved[target]["score"] > was["score"]
    assert not env.redis.exists(redis_keys.streaming_state(namespace, STREAMING_VIEW, visitor_key))
    # The anonymous id now asks as the person: the same answer.
    by_cookie = rank_as(server, anonymous_id=visitor)
    assert [i["item_id"] for i in by_cookie["items"]] == [i["item_id"] for i in after["items"]]


@pytest.mark.usefixtures("streaming_server")
def test_forgetting_the_known_id_forgets_the_person_under_both_ids(server: Server) -> None:
    """A person who is not one of the example's (their offline rows stay for the
    session's other tests): consent, clicks and a decision under both ids, linked."""
    env = Environment.open()
    namespace = env.home.namespace
    member, visitor = f"member-{uuid.uuid4().hex[:12]}", f"cookie-{uuid.uuid4().hex}"
    grant(server, True, user_id=member)
    grant(server, True, anonymous_id=visitor)
    posted = post_events(server, [anonymous_click(visitor, 1), anonymous_click(visitor, 2)])
    assert posted.status_code == 202, posted.text
    consumed(env, newest(posted.json()["stream_ids"]))
    linked = call(
        server, "/v1/identify", {"user_id": member, "anonymous_ids": [visitor], "region": "EU"}
    )
    assert linked.status_code == 200, linked.text
    answer = rank_as(server, user_id=member)  # no profile rows: the fallback answers
    clicked = click(member, answer["items"][0]["item_id"], request_id=answer["request_id"])
    posted = post_events(server, [clicked])
    consumed(env, newest(posted.json()["stream_ids"]))
    member_key, visitor_key = user_key(member), id_key(IdKind.ANONYMOUS, visitor)
    state = redis_keys.streaming_state(namespace, STREAMING_VIEW, member_key)
    assert CountState.read(env.redis.hgetall(state)).counts  # the visitor's clicks joined
    control = user_with(env.consent, PURPOSE, ConsentState.GRANTED, skip=62)
    control_consent = env.redis.hgetall(redis_keys.consent(namespace, user_key(control)))
    time.sleep(0.5)  # the audit record of the answer is written after it

    result = CliRunner().invoke(main, ["privacy", "forget", member])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"erased for user key {member_key[:8]}")
    assert "1 consent record" in lines[0] and "1 decision" in lines[0], lines[0]
    assert lines[1].startswith(f"erased for anonymous id key {visitor_key[:8]}")
    assert "2 events" in lines[1], lines[1]
    assert lines[2].startswith("and ") and "of 2 ids" in lines[2], lines[2]
    assert member not in result.output and visitor not in result.output
    assert places_holding(env.redis, [member_key.encode(), visitor_key.encode()]) == []
    assert env.redis.hgetall(redis_keys.consent(namespace, user_key(control))) == control_consent


def test_a_denial_on_the_anonymous_id_survives_the_link(server: Server) -> None:
    env = Environment.open()
    person = user_with(env.consent, PURPOSE, ConsentState.GRANTED, skip=61)
    visitor = f"cookie-{uuid.uuid4().hex}"
    grant(server, False, anonymous_id=visitor)
    assert rank_as(server, user_id=person)["fallback"] is None
    linked = call(server, "/v1/identify", {"user_id": person, "anonymous_ids": [visitor]})
    assert linked.status_code == 200 and linked.json()["consent_merged"] == 1, linked.text
    for ids in ({"user_id": person}, {"anonymous_id": visitor}):
        answer = rank_as(server, **ids)
        assert answer["fallback"]["reason"] == "no_consent", answer
        consent = next(c for c in answer["policy"]["checks"] if c["check"] == "consent")
        assert consent["result"] == "denied"
        assert "linked-id" in str(answer["policy"]["checks"]), answer["policy"]
    # A later grant under either id is the person's newest decision.
    grant(server, True, anonymous_id=visitor)
    assert rank_as(server, user_id=person)["fallback"] is None
    unlinked = call(server, "/v1/unlink", {"anonymous_id": visitor})
    assert unlinked.status_code == 200 and unlinked.json() == {"unlinked": True}


@pytest.mark.usefixtures("streaming_server")
def test_outcomes_of_an_anonymous_answer_join_across_the_link(server: Server) -> None:
    env = Environment.open()
    person = user_with(env.consent, PURPOSE, ConsentState.GRANTED, skip=63)
    visitor = f"cookie-{uuid.uuid4().hex}"
    grant(server, True, anonymous_id=visitor)
    # A visitor has no profile rows: the answer may be the fallback's, and is kept
    # for its outcomes all the same.
    shown = rank_as(server, anonymous_id=visitor)
    request_id, item = shown["request_id"], shown["items"][0]["item_id"]
    decision = redis_keys.decision(env.home.namespace, request_id)
    time.sleep(0.3)  # the decision is indexed after the answer
    assert env.redis.hget(decision, "u") == id_key(IdKind.ANONYMOUS, visitor).encode()
    assert call(server, "/v1/identify", {"user_id": person, "anonymous_ids": [visitor]}).is_success
    # Signed in now, the person clicks what they were shown as a visitor.
    event = click(person, item, request_id=request_id, region="EU")
    posted = post_events(server, [event | {"type": "click"}])
    assert posted.status_code == 202, posted.text
    consumed(env, newest(posted.json()["stream_ids"]))
    assert env.redis.hget(decision, "joined") == b"1"


def test_links_the_policy_does_not_allow_are_refused_and_change_nothing(server: Server) -> None:
    env = Environment.open()
    first, second = (f"member-{uuid.uuid4().hex[:12]}" for _ in range(2))
    namespace = env.home.namespace
    people = {"user_id": first}
    cases = [
        (people | {"user_ids": [second]}, 409, "user_ids.0", "signed in"),
        (people | {"user_ids": [first]}, 422, "user_ids.0", "a link to itself"),
        (people | {"anonymous_ids": ["ok", "no good"]}, 422, "anonymous_ids.1", "letters"),
        (people | {"anonymous_ids": ["a"], "region": "Mars"}, 422, "region", "unknown region"),
    ]
    for body, status, field, problem in cases:
        response = call(server, "/v1/identify", body)
        assert response.status_code == status, response.text
        problems = {p["field"]: p["problem"] for p in response.json()["problems"]}
        assert problem in problems.get(field, ""), problems
    for raw in (first, second):
        assert not env.redis.exists(redis_keys.identity_link(namespace, user_key(raw)))
        assert not env.redis.exists(redis_keys.identity_ids(namespace, user_key(raw)))
    # The bound: 1,000 ids per person (the policy's default), the person's own included.
    for batch in range(10):
        size = 99 if batch == 9 else 100
        ids = [f"device-{batch}-{n}-{uuid.uuid4().hex[:6]}" for n in range(size)]
        assert call(server, "/v1/identify", people | {"anonymous_ids": ids}).status_code == 200
    over = call(server, "/v1/identify", people | {"anonymous_ids": ["device-1001"]})
    assert over.status_code == 409, over.text
    [problem] = over.json()["problems"]
    assert problem["field"] == "anonymous_ids.0" and "1001 ids" in problem["problem"]
    assert env.redis.hlen(redis_keys.identity_ids(namespace, user_key(first))) == 1000
    # A key without the identify scope may not link.
    keyless = httpx.post(f"{server.base_url}/v1/identify", json=people, timeout=10)
    assert keyless.status_code == 401
    CliRunner().invoke(main, ["privacy", "forget", first])


@pytest.mark.parametrize("path", ["/v1/rank", "/v1/consent"])
def test_a_request_without_any_id_names_user_id(server: Server, path: str) -> None:
    body = {"purpose": PURPOSE, "region": "EU"} if path == "/v1/rank" else {}
    if path == "/v1/consent":
        body = {"purposes": {PURPOSE: True}, "source": "banner"}
    response = call(server, path, body)
    assert response.status_code == 422, response.text
    assert "user_id" in {p["field"] for p in response.json()["problems"]}
