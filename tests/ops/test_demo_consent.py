"""Demo consent is opt-in and removable: `rankgate setup --demo-consent` writes it,
`rankgate privacy demo-consent list|remove` counts and removes it, and only it.

On the session's embedded Redis: the sweep's own tests write people under a
namespace of their own; the command tests use the session home's demo records and
leave them as setup wrote them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankgate.core import redis_keys
from rankgate.core.errors import RankgateError
from rankgate.core.pseudonym import user_key
from rankgate.governance import demo_consent as demo_module
from rankgate.governance.consent import ConsentState, ConsentStore
from rankgate.governance.demo_consent import (
    DEMO_SOURCE,
    DemoConsentSweep,
    demo_consent,
)
from rankgate.ops.consent_import import import_consent
from rankgate.ops.environment import Environment
from rankgate.ops.setup import write_demo_consent
from serving.contract.parsing import BadRequest, parse_consent
from serving.runtime import ReplicaRuntime
from tests.ranking.test_pipeline import make_pipeline

EMAIL, ONSITE = "email_marketing", "onsite_personalization"


def expected_tally(ids: list[str], purposes: list[str]) -> Counter[tuple[str, bool]]:
    """Demo records per (purpose, granted), from `demo_consent` itself."""
    return Counter(
        (purpose, granted)
        for uid in ids
        for purpose, granted in demo_consent(uid, purposes).items()
    )


@pytest.fixture
def namespace(env: Environment, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own on the session's server; emptied afterwards."""
    name = f"demo-test-{request.node.name[:40]}"
    yield name
    pattern = redis_keys.glob_escape(name) + ":*"
    names = list(env.redis.scan_iter(match=pattern, count=1000))
    if names:
        env.redis.delete(*names)


def stored(env: Environment, namespace: str, uid: str) -> dict[str, dict[str, object]]:
    raw = env.redis.hgetall(redis_keys.consent(namespace, user_key(uid)))
    return {field.decode(): json.loads(value) for field, value in raw.items()}


def test_removal_takes_the_demo_records_and_no_other(
    env: Environment, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person keeps their real decision beside a removed demo one; a source that
    merely contains the demo source's name is real; people without demo records are
    not touched. Small SCAN steps: the sweep goes on across steps and calls."""
    monkeypatch.setattr(demo_module, "SCAN_COUNT", 64)
    store = ConsentStore(env.redis, namespace)
    purposes = [EMAIL, ONSITE]
    ids = [f"demo-person-{n}" for n in range(400)]
    write_demo_consent(store, ids, purposes)
    both = next(uid for uid in ids if len(demo_consent(uid, purposes)) == 2)
    store.record(user_key(both), {EMAIL: False}, source="cmp")  # real, over the demo one
    store.record(user_key("real-only"), {EMAIL: True, ONSITE: True}, source="cmp")
    store.record(user_key("look-alike"), {ONSITE: False}, source=f"not-{DEMO_SOURCE}")
    expected = expected_tally(ids, purposes)
    expected[(EMAIL, demo_consent(both, purposes)[EMAIL])] -= 1

    sweep = DemoConsentSweep(env.redis, namespace)
    counted = sweep.count()
    assert counted.decisions == expected
    assert counted.people == sum(1 for uid in ids if demo_consent(uid, purposes))
    assert counted.people_read == counted.people + 2

    removed = sweep.remove()
    assert removed.decisions == expected
    assert removed.left_without_record == counted.people - 1  # `both` keeps its real record
    kept = stored(env, namespace, both)
    assert list(kept) == [EMAIL]
    assert (kept[EMAIL]["granted"], kept[EMAIL]["source"]) == (False, "cmp")
    assert set(stored(env, namespace, "real-only")) == {EMAIL, ONSITE}
    assert stored(env, namespace, "look-alike")[ONSITE]["source"] == f"not-{DEMO_SOURCE}"
    assert all(not stored(env, namespace, uid) for uid in ids if uid != both)
    assert sweep.count().records == 0
    assert sweep.remove().records == 0


def test_a_real_decision_written_after_the_listing_is_kept(
    env: Environment, namespace: str
) -> None:
    """The source is read again where the record is deleted: a consent platform's
    decision that replaced a demo record after it was counted survives the removal."""
    store = ConsentStore(env.redis, namespace)
    ids = [f"listed-{n}" for n in range(60)]
    write_demo_consent(store, ids, [ONSITE])
    sweep = DemoConsentSweep(env.redis, namespace)
    listed = sweep.count()
    replaced = next(uid for uid in ids if ONSITE in demo_consent(uid, [ONSITE]))
    store.record(user_key(replaced), {ONSITE: True}, source="cmp")
    removed = sweep.remove()
    assert removed.records == listed.records - 1
    assert stored(env, namespace, replaced)[ONSITE]["source"] == "cmp"
    assert store.state(user_key(replaced), ONSITE) == ConsentState.GRANTED


def test_real_writers_refuse_the_demo_source(
    env: Environment, runtime: ReplicaRuntime, tmp_path: Path
) -> None:
    """Only setup writes the demo source: POST /v1/consent and `consent import` name
    the field and write nothing."""
    body = {"user_id": "u-1", "purposes": {EMAIL: True}, "source": DEMO_SOURCE}
    with pytest.raises(BadRequest) as caught:
        parse_consent(json.dumps(body).encode(), make_pipeline(runtime).rules)
    assert [p.field for p in caught.value.problems] == ["source"]
    assert "made-up demo records" in caught.value.problems[0].problem

    export = tmp_path / "consent.csv"
    export.write_text(
        "user_id,purpose,decision,source,updated_at\n"
        f"refused-1,{EMAIL},granted,{DEMO_SOURCE},2026-03-01T12:00:00Z\n"
    )
    with pytest.raises(RankgateError, match="row 1, column 'source': 'rankgate-demo' marks"):
        import_consent(export)
    assert env.consent.state(user_key("refused-1"), EMAIL) == ConsentState.UNKNOWN
