"""`rankgate privacy forget`: one person's data erased everywhere, nobody else's touched.

Real embedded Redis, real Feast, audit records written by the real pipeline; a
streaming view's row pushed through Feast's push path; events, streaming states
and decision hashes written in the shapes their writers use (serving.events.intake,
redis_keys).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import pytest
import redis
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.errors import RedisUnavailable
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.settings import get_project, get_settings
from rankgate.governance.demo_consent import DEMO_SOURCE, demo_consent
from rankgate.governance.policy import load_policy
from rankgate.ops.environment import Environment
from rankgate.ops.erasure import Eraser, event_owner, feast_user_key, glob_escape
from serving.events.intake import StoredEvent
from serving.runtime import ReplicaRuntime
from tests.ranking.test_pipeline import LOOP, make_pipeline, rank
from tests.redis_contents import PAGE, places_holding
from tests.serving_support import example_user_ids

# The tables the example's prepare step writes into the home's data folder.
PREPARED_FILES = (
    "user_profile.parquet",
    "user_item_affinity.parquet",
    "item_context.parquet",
    "impressions.parquet",
    "recent_clicks.parquet",
    "people.parquet",
)
# Not an example user: someone else whose events, streaming state and decisions
# must survive the erasure (erased when the module is done).
BYSTANDER = "u-privacy-bystander"


@dataclass(frozen=True)
class Traces:
    """What the home holds of one person."""

    feature_views: tuple[str, ...]
    consent: dict[bytes, bytes]
    audit_records: int
    offline_rows: dict[str, int]
    events: int = 0
    streaming_states: int = 0
    decisions: int = 0

    @classmethod
    def of(cls, env: Environment, uid: str) -> Traces:
        key = user_key(uid)
        namespace = env.home.namespace
        events = 0
        lower = "-"
        while page := env.redis.xrange(redis_keys.events(namespace), min=lower, count=PAGE):
            events += sum(event_owner(fields) == key for _, fields in page)  # links: a set
            lower = "(" + page[-1][0].decode()
        states = len(
            list(
                env.redis.scan_iter(
                    match=redis_keys.streaming_state(glob_escape(namespace), "*", key)
                )
            )
        )
        decisions = sum(
            env.redis.hget(name, "u") == key.encode()
            for name in env.redis.scan_iter(match=redis_keys.decision(glob_escape(namespace), "*"))
        )
        views = []
        for name in env.redis.scan_iter(match=f"*{key}*", count=1000):
            if feast_user_key(name, env.home.namespace, "user_key") == key:
                fields = env.redis.hkeys(name)
                views += [f[4:].decode() for f in fields if f.startswith(b"_ts:")]
        audit = 0
        lower = "-"
        while page := env.redis.xrange(redis_keys.audit(env.home.namespace), min=lower, count=PAGE):
            audit += sum(key.encode() in fields[b"record"] for _, fields in page)
            lower = "(" + page[-1][0].decode()
        offline = {}
        for name in PREPARED_FILES:
            frame = pd.read_parquet(env.data_dir / name)
            if "user_key" in frame.columns:
                offline[name.removesuffix(".parquet")] = int((frame["user_key"] == key).sum())
        return cls(
            feature_views=tuple(sorted(views)),
            consent=env.redis.hgetall(redis_keys.consent(env.home.namespace, key)),
            audit_records=audit,
            offline_rows=offline,
            events=events,
            streaming_states=states,
            decisions=decisions,
        )


@pytest.fixture(scope="module")
def offline_tables(ready_home: Home) -> Iterator[None]:
    """Once this module is done, the forgotten person is back as setup made them:
    prepared tables, online features and demo consent. Other test files read them
    (row positions of the training log, every example user's features)."""
    paths = [ready_home.data_dir / name for name in PREPARED_FILES]
    saved = {path: path.read_bytes() for path in paths}
    yield
    for path, content in saved.items():
        path.write_bytes(content)
    env = Environment.open()
    env.materialize()
    purposes = list(load_policy().purposes)
    for uid in example_user_ids():
        if not env.redis.exists(redis_keys.consent(env.home.namespace, user_key(uid))):
            decisions = demo_consent(uid, purposes)
            env.consent.record(user_key(uid), decisions, source=DEMO_SOURCE)


@pytest.fixture(scope="module")
def people(ready_home: Home) -> tuple[str, str]:
    """The person to forget and a control: the last two example users with a consent
    record. Other tests take the first users of a consent state, never these."""
    env = Environment.open()
    namespace = env.home.namespace
    known = [
        uid
        for uid in reversed(example_user_ids())
        if env.redis.exists(redis_keys.consent(namespace, user_key(uid)))
    ]
    return known[0], known[1]


@dataclass(frozen=True)
class Forgotten:
    person: str
    control: str
    before: Traces
    control_before: Traces
    output: str
    bystander_before: Traces
    baseline: Traces


def write_event_traces(env: Environment, uid: str, events: int, decisions: int) -> None:
    """What the event path keeps of a person: a row of the streaming view pushed
    through Feast, events in the stream, the consumer's state hashes (of the declared
    view and of one no longer declared) and decision hashes naming them."""
    from feast.data_source import PushMode

    key, namespace = user_key(uid), env.home.namespace
    now = datetime.now(UTC)
    row = {"user_key": [key], "event_timestamp": [pd.Timestamp(now)]}
    row.update({f"clicks_{i}": [0.5 if i == 3 else 0.0] for i in range(80)})
    env.feast.push("recent_clicks_push", pd.DataFrame(row), to=PushMode.ONLINE)
    # Types no streaming view counts: a consumer that may be running changes nothing.
    for n in range(events):
        event = StoredEvent(
            event_id=f"privacy-{uid}-{n}",
            type=("add_to_cart", "impression")[n % 2],
            user_key=key,
            item_id=3 + n,
            at=now.timestamp(),
        )
        env.redis.xadd(redis_keys.events(namespace), {"e": event.stored()})
    for view in ("recent_clicks", "retired_view"):
        state = redis_keys.streaming_state(namespace, view, key)
        env.redis.hset(state, mapping={"clicks_3": "0.5", "at": str(now.timestamp())})
    for n in range(decisions):
        decision = redis_keys.decision(namespace, f"privacy-{uid}-{n}")
        env.redis.hset(decision, mapping={"u": key, "v": "v2", "variant": "stable", "items": "[3]"})


@pytest.fixture(scope="module")
def forgotten(
    offline_tables: None, people: tuple[str, str], runtime: ReplicaRuntime
) -> Iterator[Forgotten]:
    """Decisions for both people go through the real pipeline into the audit stream,
    the person and a bystander have events, streaming rows and states and decision
    hashes; then the person is forgotten with the CLI."""
    person, control = people
    env = Environment.open()
    baseline = Traces.of(env, person)  # what earlier tests of the session left
    write_event_traces(env, person, events=3, decisions=2)
    write_event_traces(env, BYSTANDER, events=2, decisions=1)
    pipeline = make_pipeline(runtime)
    for uid, requests in ((person, 4), (control, 3)):
        for n in range(requests):
            rank(
                pipeline,
                user_id=uid,
                purpose=("onsite_personalization", "email_marketing")[n % 2],
                region=("EU", "US")[n % 2],
            )
    assert LOOP.run_until_complete(pipeline.recorder.audit.flush())
    before, control_before = Traces.of(env, person), Traces.of(env, control)
    bystander_before = Traces.of(env, BYSTANDER)
    result = CliRunner().invoke(main, ["privacy", "forget", person])
    assert result.exit_code == 0, result.output
    yield Forgotten(
        person, control, before, control_before, result.output, bystander_before, baseline
    )
    Eraser(env.redis, env.home, env.project).forget(BYSTANDER)


def test_the_person_has_data_everywhere_before(forgotten: Forgotten) -> None:
    before = forgotten.before
    assert before.feature_views == ("recent_clicks", "user_item_affinity", "visitor_profile")
    assert before.consent and before.audit_records >= 4
    # Decisions: the 2 written above and the 4 the pipeline indexed (the example
    # project declares outcomes, so each decision is kept for them to join), over
    # what earlier tests of the session left.
    base = forgotten.baseline
    assert (before.events - base.events, before.decisions - base.decisions) == (3, 6)
    assert before.streaming_states == 2
    assert before.offline_rows["user_profile"] == before.offline_rows["user_item_affinity"] == 1
    assert before.offline_rows["people"] == 1  # the made-up region of data_regions
    assert before.offline_rows["impressions"] >= 1


def test_the_report_counts_what_was_erased(forgotten: Forgotten) -> None:
    key, before = user_key(forgotten.person), forgotten.before
    offline = before.offline_rows
    assert forgotten.output == (
        f"erased for user key {key[:8]}…: 1 recent_clicks row, 1 user_item_affinity row, "
        f"1 visitor_profile row, 1 consent record, {before.audit_records} audit records, "
        f"{before.events} events, 2 streaming states, {before.decisions} decisions, "
        f"{sum(offline.values())} offline rows (impressions {offline['impressions']}, "
        "people 1, user_item_affinity 1, user_profile 1)\n"
    )
    assert forgotten.person not in forgotten.output and key not in forgotten.output


def test_nothing_of_the_person_is_left_in_redis(forgotten: Forgotten, env: Environment) -> None:
    needles = [user_key(forgotten.person).encode(), forgotten.person.encode()]
    assert places_holding(env.redis, needles) == []
    assert Traces.of(env, forgotten.person) == Traces(
        (), {}, 0, dict.fromkeys(forgotten.before.offline_rows, 0)
    )


def test_the_control_person_keeps_everything(forgotten: Forgotten, env: Environment) -> None:
    control = forgotten.control_before
    assert control.feature_views and control.consent and control.audit_records >= 3
    assert Traces.of(env, forgotten.control) == control


def test_other_people_keep_their_events_states_and_decisions(
    forgotten: Forgotten, env: Environment
) -> None:
    bystander = Traces.of(env, BYSTANDER)
    assert bystander == forgotten.bystander_before
    assert bystander.feature_views == ("recent_clicks",)
    assert (bystander.events, bystander.streaming_states, bystander.decisions) == (2, 2, 1)


def test_a_second_forget_erases_nothing_and_says_so(forgotten: Forgotten) -> None:
    result = CliRunner().invoke(main, ["privacy", "forget", forgotten.person])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"nothing to erase for user key {user_key(forgotten.person)[:8]}…:"
    )


def test_materializing_again_does_not_bring_the_person_back(
    forgotten: Forgotten, env: Environment
) -> None:
    result = CliRunner().invoke(main, ["features", "materialize"])
    assert result.exit_code == 0, result.output
    assert places_holding(env.redis, [user_key(forgotten.person).encode()]) == []
    assert Traces.of(env, forgotten.control) == forgotten.control_before
    again = CliRunner().invoke(main, ["privacy", "forget", forgotten.person])
    assert again.output.startswith("nothing to erase")


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("", "user id: empty"),
        ("u" * 129, "user id: at most 128 characters"),
        ("bad id!", "user id: letters, digits"),
    ],
)
def test_a_bad_user_id_is_refused_without_repeating_it(user_id: str, problem: str) -> None:
    result = CliRunner().invoke(main, ["privacy", "forget", user_id])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {problem}")
    assert "Traceback" not in result.output
    assert not user_id or user_id not in result.output


@pytest.mark.usefixtures("offline_tables")
def test_a_redis_that_is_down_is_named_and_nothing_is_erased(
    ready_home: Home, people: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = people[1]
    tables = {name: (ready_home.data_dir / name).read_bytes() for name in PREPARED_FILES}
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(RedisUnavailable, match=r"127\.0\.0\.1:1: .*nothing was erased"):
        Eraser(dead, ready_home, get_project()).forget(uid)
    assert {n: (ready_home.data_dir / n).read_bytes() for n in PREPARED_FILES} == tables

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["privacy", "forget", uid])
    finally:
        monkeypatch.delenv("REDIS_URL")
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "error: Redis unreachable at 127.0.0.1:1" in result.output
    assert "Traceback" not in result.output and uid not in result.output


def test_one_pass_over_the_keyspace_finds_the_rows_a_scan_per_id_finds(
    env: Environment, people: tuple[str, str]
) -> None:
    """A person of many linked ids has their Feast rows found in one pass."""
    eraser = Eraser(env.redis, env.home, env.project)
    keys = {user_key(p) for p in people} | {user_key(f"nobody-{n}") for n in range(5)}
    one_pass = eraser.feature_row_names(keys)
    for key in keys:
        each = sorted(
            name
            for name in env.redis.scan_iter(match=f"*{key}*", count=1000)
            if feast_user_key(name, env.home.namespace, env.project.spec.user.join_key) == key
        )
        assert sorted(one_pass.get(key, [])) == each, key
    assert one_pass.get(user_key(people[1]))  # the control keeps its rows throughout
