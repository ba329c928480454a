"""Linked ids (rankgate.governance.identity): the consent rule on linking, the bounds
of a link, unlinking, and the streaming merge, against the real embedded server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from features.streaming import CountState, StreamingCounts
from rankgate.core import redis_keys
from rankgate.core.project import StreamingView
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import connect_async, resolve_redis_url
from rankgate.governance.consent import AsyncConsentStore, ConsentState
from rankgate.governance.identity import (
    IdentityStore,
    IdKind,
    LinkEntry,
    LinkRefused,
    NamedId,
    id_key,
    merge_consent,
    request_key,
    resolve_persons,
)
from rankgate.governance.policy import IdentityRules
from rankgate.ops.environment import Environment
from serving.contract.config import BudgetConfig, LimitsConfig
from serving.contract.parsing import BadRequest, parse_identify, parse_unlink
from serving.contract.schemas import RequestRules

LOOP = asyncio.new_event_loop()
RULES = RequestRules.of(LimitsConfig(), BudgetConfig(), ["ads"], ["EU", "US"], [1, 2, 3])


def record(granted: bool, at: str, source: str = "cmp") -> str:
    return json.dumps({"granted": granted, "source": source, "updated_at": at})


EARLY, LATE = "2026-01-01T00:00:00+00:00", "2026-06-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("kept", "joining", "rule", "winner"),
    [
        # A denial is never lost by a link under the default rule, however old.
        (record(True, LATE), record(False, EARLY), "most_restrictive", "joining"),
        (record(False, EARLY), record(True, LATE), "most_restrictive", "kept"),
        (record(True, EARLY), record(True, LATE), "most_restrictive", "joining"),
        # Latest: the newer decision, a denial on equal times.
        (record(True, LATE), record(False, EARLY), "latest", "kept"),
        (record(False, EARLY), record(True, LATE), "latest", "joining"),
        (record(True, EARLY), record(False, EARLY), "latest", "joining"),
        (None, record(True, EARLY), "latest", "joining"),
    ],
)
def test_the_policy_rule_decides_between_linked_ids_records(
    kept: str | None, joining: str, rule: str, winner: str
) -> None:
    ours = {b"ads": kept.encode()} if kept else {}
    written = merge_consent(ours, {b"ads": joining.encode()}, rule)
    if winner == "kept":
        assert written == {}
    else:
        assert json.loads(written["ads"]) == json.loads(joining) | {"via": "linked-id"}


def test_anonymous_and_user_ids_of_the_same_text_are_two_ids() -> None:
    assert id_key(IdKind.ANONYMOUS, "abc") != id_key(IdKind.USER, "abc") == user_key("abc")
    assert request_key("abc", "xyz") == user_key("abc")  # signed in: the user id
    assert request_key(None, "xyz") == id_key(IdKind.ANONYMOUS, "xyz")


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"user_id": "u1", "user_ids": ["u1"]}, "user_ids.0", "a link to itself"),
        ({"user_id": "u1", "anonymous_ids": ["a", "a"]}, "anonymous_ids.1", "named twice"),
        ({"user_id": "u1"}, "anonymous_ids", "no id to link"),
        ({"user_id": "u1", "anonymous_ids": ["bad id"]}, "anonymous_ids.0", "letters, digits"),
        ({"user_id": "u1", "anonymous_ids": [f"a{n}" for n in range(101)]}, "anonymous_ids", "101"),
        ({"user_id": "u1", "anonymous_ids": ["a"], "region": "Mars"}, "region", "unknown region"),
    ],
)
def test_a_bad_link_request_names_its_field(body: dict, field: str, problem: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_identify(json.dumps(body).encode(), RULES)
    found = {p.field: p.problem for p in refused.value.problems}
    assert field in found and problem in found[field], found


def test_an_unlink_names_exactly_one_id() -> None:
    for body in ({}, {"user_id": "u", "anonymous_id": "a"}):
        with pytest.raises(BadRequest, match="exactly one"):
            parse_unlink(json.dumps(body).encode(), RULES)
    assert parse_unlink(b'{"anonymous_id": "a"}', RULES).anonymous_id == "a"


def test_merged_counts_decay_to_the_latest_time_and_mark_the_link() -> None:
    spec = StreamingView.model_validate(
        {
            "view": "v",
            "push_source": "p",
            "events": ["click"],
            "per": "total",
            "field": "clicks",
            "half_life_s": 100,
        }
    )
    counts = StreamingCounts(spec, [1, 2])
    mine = CountState(at=1000.0, through="5-0", counts={"clicks": 2.0})
    theirs = CountState(at=1100.0, through="7-0", counts={"clicks": 1.0})
    counts.merge(mine, [theirs], "9-0")
    assert mine.at == 1100.0 and mine.through == "9-0"
    assert mine.counts["clicks"] == pytest.approx(2.0 * 0.5 + 1.0)
    assert mine.applied("9-0") and not mine.applied("9-1")


# -- against the embedded server ------------------------------------------------------


@pytest.fixture
def store(env: Environment) -> Iterator[tuple[IdentityStore, AsyncConsentStore, str]]:
    namespace = f"identity-test-{uuid.uuid4().hex[:8]}"
    client = connect_async(resolve_redis_url())
    yield IdentityStore(client, namespace), AsyncConsentStore(client, namespace), namespace
    for key in env.redis.scan_iter(match=f"{namespace}:*", count=1000):
        env.redis.delete(key)
    LOOP.run_until_complete(client.aclose())


def user(raw: str, field: str = "user_id") -> NamedId:
    return NamedId(field, IdKind.USER, id_key(IdKind.USER, raw))


def anonymous(raw: str, field: str) -> NamedId:
    return NamedId(field, IdKind.ANONYMOUS, id_key(IdKind.ANONYMOUS, raw))


def test_a_denial_on_the_anonymous_id_survives_the_link(store, env: Environment) -> None:  # type: ignore[no-untyped-def]
    identities, consents, namespace = store
    rules = IdentityRules()
    known, visitor = user("u-1"), anonymous("cookie-1", "anonymous_ids.0")
    LOOP.run_until_complete(consents.record(known.key, {"ads": True}, "cmp"))
    LOOP.run_until_complete(consents.record(visitor.key, {"ads": False}, "banner"))
    result = LOOP.run_until_complete(identities.link(known, [visitor], rules, "EU"))
    assert (result.linked, result.ids, result.consent_merged) == (["anonymous_ids.0"], 2, 1)
    for asking in (known.key, visitor.key):
        person = LOOP.run_until_complete(consents.read_person(asking, "ads", 1.0))
        assert person is not None
        assert (person.person, person.state, person.via) == (
            known.key,
            ConsentState.DENIED,
            "linked-id",
        )
    # A decision recorded after the link, under either id, is the person's newest.
    LOOP.run_until_complete(consents.record(visitor.key, {"ads": True}, "banner"))
    person = LOOP.run_until_complete(consents.read_person(known.key, "ads", 1.0))
    assert person is not None and person.state is ConsentState.GRANTED and person.via is None
    assert not env.redis.exists(redis_keys.consent(namespace, visitor.key))
    # The link went into the event stream for the consumer, naming keys only.
    [(stream_id, fields)] = env.redis.xrange(redis_keys.events(namespace))
    link = LinkEntry.read(stream_id, fields)
    assert (link.person, link.joined, link.region) == (known.key, (visitor.key,), "EU")
    # Linking again changes nothing.
    again = LOOP.run_until_complete(identities.link(known, [visitor], rules))
    assert again.linked == [] and again.already == ["anonymous_ids.0"]
    assert env.redis.xlen(redis_keys.events(namespace)) == 1


def test_a_person_of_two_signed_in_ids_needs_the_policy(store, env: Environment) -> None:  # type: ignore[no-untyped-def]
    identities, _, namespace = store
    first, second = user("u-1"), user("u-2", "user_ids.0")
    with pytest.raises(LinkRefused) as refused:
        LOOP.run_until_complete(identities.link(first, [second], IdentityRules()))
    assert refused.value.problems[0]["field"] == "user_ids.0"
    assert list(env.redis.scan_iter(match=f"{namespace}:*")) == []  # nothing written
    allowed = IdentityRules(link_known_ids=True)
    assert LOOP.run_until_complete(identities.link(first, [second], allowed)).ids == 2
    persons = LOOP.run_until_complete(resolve_persons(identities.client, namespace, [second.key]))
    assert persons == {second.key: first.key}


def test_a_person_has_at_most_max_ids(store, env: Environment) -> None:  # type: ignore[no-untyped-def]
    identities, _, namespace = store
    rules = IdentityRules(max_ids=4)
    first = anonymous("c-1", "anonymous_ids.0")
    known = user("u-9")
    LOOP.run_until_complete(
        identities.link(known, [first, anonymous("c-2", "anonymous_ids.1")], rules)
    )
    LOOP.run_until_complete(identities.link(known, [anonymous("c-3", "anonymous_ids.0")], rules))
    with pytest.raises(LinkRefused) as refused:
        LOOP.run_until_complete(
            identities.link(known, [anonymous("c-4", "anonymous_ids.0")], rules)
        )
    assert refused.value.problems[0]["field"] == "anonymous_ids.0"
    assert "5 ids" in refused.value.problems[0]["problem"]
    ids = env.redis.hgetall(redis_keys.identity_ids(namespace, known.key))
    assert len(ids) == 4 and json.loads(ids[known.key.encode()])["kind"] == "user"
    # Where the policy lets signed-in people join, a person joins with all their ids.
    other = user("u-10")
    joined = LOOP.run_until_complete(
        identities.link(other, [first], IdentityRules(link_known_ids=True))
    )
    assert joined.ids == 5
    keys = [known.key, first.key, id_key(IdKind.ANONYMOUS, "c-3")]
    persons = LOOP.run_until_complete(resolve_persons(identities.client, namespace, keys))
    assert set(persons.values()) == {other.key}
    assert not env.redis.exists(redis_keys.identity_ids(namespace, known.key))


def test_an_unlinked_id_keeps_the_persons_consent(store, env: Environment) -> None:  # type: ignore[no-untyped-def]
    identities, consents, namespace = store
    known, visitor = user("u-3"), anonymous("c-9", "anonymous_ids.0")
    LOOP.run_until_complete(consents.record(known.key, {"ads": False}, "cmp"))
    LOOP.run_until_complete(identities.link(known, [visitor], IdentityRules()))
    with pytest.raises(LinkRefused, match="own id"):
        LOOP.run_until_complete(identities.unlink(known))
    assert LOOP.run_until_complete(identities.unlink(visitor)) is True
    assert LOOP.run_until_complete(identities.unlink(visitor)) is False
    person = LOOP.run_until_complete(consents.read_person(visitor.key, "ads", 1.0))
    assert person is not None and person.person == visitor.key
    assert person.state is ConsentState.DENIED
    assert not env.redis.exists(redis_keys.identity_ids(namespace, known.key))
