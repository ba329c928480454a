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
from click.testing import CliRunner

from loadtests.bench.systems import request_bodies
from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.errors import RankgateError
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.settings import get_settings
from rankgate.governance import demo_consent as demo_module
from rankgate.governance.consent import ConsentState, ConsentStore
from rankgate.governance.demo_consent import (
    DEMO_SOURCE,
    DemoConsentSweep,
    demo_consent,
)
from rankgate.governance.identity import VIA_LINK, merge_consent
from rankgate.governance.policy import load_policy
from rankgate.ops.consent_import import import_consent
from rankgate.ops.environment import Environment
from rankgate.ops.setup import run_setup, write_demo_consent
from serving.contract.parsing import BadRequest, parse_consent
from serving.runtime import ReplicaRuntime
from tests.ranking.test_pipeline import make_pipeline
from tests.serving_support import example_user_ids

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


def stored_tally(env: Environment) -> tuple[Counter[tuple[str, bool]], int]:
    """Demo records per (purpose, granted) in the session home, and how many people
    hold one, read hash by hash (not through the sweep under test)."""
    tally: Counter[tuple[str, bool]] = Counter()
    people = 0
    pattern = redis_keys.consent(redis_keys.glob_escape(env.home.namespace), "*")
    for name in env.redis.scan_iter(match=pattern, count=1000):
        mine = [
            (field.decode(), bool(record["granted"]))
            for field, value in env.redis.hgetall(name).items()
            if (record := json.loads(value))["source"] == DEMO_SOURCE
        ]
        tally.update(mine)
        people += bool(mine)
    return tally, people


@pytest.fixture
def restores_demo_consent(ready_home: Home) -> Iterator[None]:
    """The session home's demo records as setup writes them, whatever the test left."""
    yield
    env = Environment.open()
    env.redis.delete(env.marker_key("demo_consent"))
    run_setup(lambda _line: None, demo_consent=True)


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


def test_setup_writes_demo_consent_only_when_asked(
    env: Environment, restores_demo_consent: None
) -> None:
    """`privacy demo-consent list`, `remove` (refused without --yes, then done), and
    setup without the flag writing none; with it, all again (the marker was removed)."""
    ids = example_user_ids()
    purposes = list(load_policy().purposes)
    # What the home holds, read here record by record: other tests of the session
    # replace some example users' records and add others' (a second project set up in
    # the same home, ids unlinked with a copy of their person's records).
    expected, people = stored_tally(env)
    runner = CliRunner()

    listed = runner.invoke(main, ["privacy", "demo-consent", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"found {sum(expected.values())} demo consent records of {people} people" in (
        listed.output
    )
    granted, denied = expected[(EMAIL, True)], expected[(EMAIL, False)]
    assert any(
        line.split() == [EMAIL, str(granted), str(denied)] for line in listed.output.splitlines()
    )

    refused = runner.invoke(main, ["privacy", "demo-consent", "remove"])
    assert refused.exit_code == 1
    assert "would remove" in refused.output and "nothing removed: add --yes" in refused.output
    assert DemoConsentSweep(env.redis, env.home.namespace).count().decisions == expected

    removed = runner.invoke(main, ["privacy", "demo-consent", "remove", "--yes"])
    assert removed.exit_code == 0, removed.output
    assert f"removed {sum(expected.values())} demo consent records" in removed.output
    assert not env.redis.exists(env.marker_key("demo_consent"))
    states = env.consent.states([user_key(uid) for uid in ids], EMAIL)
    assert set(states) == {ConsentState.UNKNOWN}

    # The benchmark ranks demo users with granted consent: without the made-up records,
    # only those a real source granted (other tests of the session record some).
    first = purposes[0]
    real = [
        uid
        for uid, state in zip(
            ids, env.consent.states([user_key(u) for u in ids], first), strict=True
        )
        if state is ConsentState.GRANTED
    ]
    if real:
        assert [body["user_id"] for body in request_bodies(env)] == real[:200]
    else:
        with pytest.raises(RankgateError, match="rankgate setup --demo-consent"):
            request_bodies(env)

    lines: list[str] = []
    assert run_setup(lines.append) is False
    assert any(line.startswith("note: no demo consent written") for line in lines), lines
    assert DemoConsentSweep(env.redis, env.home.namespace).count().records == 0
    nothing = runner.invoke(main, ["privacy", "demo-consent", "remove"])
    assert nothing.exit_code == 0 and "no demo consent records" in nothing.output

    lines.clear()
    assert run_setup(lines.append, demo_consent=True) is True
    assert any(line.startswith("• demo consent records: writing") for line in lines), lines
    rewritten = DemoConsentSweep(env.redis, env.home.namespace).count().decisions
    assert rewritten == expected_tally(ids, purposes) == stored_tally(env)[0]
    lines.clear()
    run_setup(lines.append)
    assert any(line.startswith("! demo consent records: kept") for line in lines), lines


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


def test_a_redis_that_is_down_is_named(ready_home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["privacy", "demo-consent", "remove", "--yes"])
    finally:
        monkeypatch.delenv("REDIS_URL")
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert result.output.startswith("error: Redis unreachable at 127.0.0.1:1"), result.output
    assert "Traceback" not in result.output


def test_a_demo_record_merged_through_a_link_is_still_demo(
    env: Environment, namespace: str
) -> None:
    """Linking ids merges a joining id's records into the person's, marked `via` a
    linked id and keeping their source: a made-up one stays removable, the person's
    real one stays."""
    store = ConsentStore(env.redis, namespace)
    visitor, person = user_key("visitor-1"), user_key("person-1")
    store.record(visitor, {EMAIL: True}, source=DEMO_SOURCE)
    store.record(person, {ONSITE: False}, source="cmp")
    joining = env.redis.hgetall(redis_keys.consent(namespace, visitor))
    kept = env.redis.hgetall(redis_keys.consent(namespace, person))
    merged = merge_consent(kept, joining, "latest")
    assert json.loads(merged[EMAIL])["via"] == VIA_LINK
    env.redis.hset(redis_keys.consent(namespace, person), mapping=merged)
    env.redis.delete(redis_keys.consent(namespace, visitor))

    removed = DemoConsentSweep(env.redis, namespace).remove()
    assert removed.decisions == Counter({(EMAIL, True): 1})
    assert store.state(person, EMAIL) == ConsentState.UNKNOWN
    assert store.state(person, ONSITE) == ConsentState.DENIED
