"""Outcomes joined to decisions, on the real pipeline and the session's embedded Redis:
the decision index beside each audit record, joins by request id and position,
redelivery counted once, outcomes no decision takes counted as unjoined."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.project import Outcomes
from rankgate.core.pseudonym import user_key
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.contract.schemas import RankResponse
from serving.events.intake import StoredEvent
from serving.events.outcome_join import (
    JOIN_SCRIPT,
    LATE_DECISION_S,
    OutcomeJoiner,
    Unjoined,
    marker,
)
from serving.observe.metrics import Metrics
from serving.observe.outcomes import read_outcomes, read_unjoined, wilson_interval
from serving.ranking.pipeline import RankPipeline
from serving.runtime import ReplicaRuntime
from tests.ranking.test_pipeline import LOOP, make_pipeline, rank
from tests.serving_support import user_with

# Type names of this test's own: nothing here assumes the example project's events.
OUTCOMES = Outcomes(impression="seen", click="tap", conversion="order")
TTL_S = 600.0


def outcome_keys(env: Environment) -> list[bytes]:
    namespace = env.home.namespace
    return [
        *env.redis.scan_iter(match=redis_keys.outcomes(namespace, "*", "*")),
        redis_keys.outcomes_unjoined(namespace).encode(),
    ]


@pytest.fixture
def indexed(runtime: ReplicaRuntime, env: Environment) -> Iterator[RankPipeline]:
    """A pipeline whose decisions are indexed (as for a project with outcomes); the
    outcome counters it leads to are removed afterwards."""
    env.redis.delete(*outcome_keys(env))
    pipeline = make_pipeline(runtime)
    runtime.recorder.audit.decision_ttl_s = TTL_S
    yield pipeline
    runtime.recorder.audit.decision_ttl_s = None
    env.redis.delete(*outcome_keys(env))


def decide(pipeline: RankPipeline, user_id: str, **body: Any) -> RankResponse:
    response = rank(
        pipeline, user_id=user_id, purpose="onsite_personalization", region="US", **body
    )
    assert LOOP.run_until_complete(pipeline.recorder.audit.flush())
    return response


def event(
    type_: str, user_id: str, item_id: Any, request_id: str | None, event_id: str | None = None
) -> StoredEvent:
    return StoredEvent(
        event_id=event_id or uuid.uuid4().hex,
        type=type_,
        user_key=user_key(user_id),
        item_id=item_id,
        at=time.time(),
        request_id=request_id,
    )


def joiner(runtime: ReplicaRuntime, env: Environment) -> tuple[OutcomeJoiner, CollectorRegistry]:
    metrics = Metrics(to_ray=False)
    return OutcomeJoiner(runtime.redis, env.home.namespace, OUTCOMES, metrics), metrics.registry


def test_each_decision_is_indexed_beside_its_audit_record(
    indexed: RankPipeline, env: Environment
) -> None:
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    personalized = decide(indexed, granted, k=5)
    fallback = decide(indexed, denied, k=5)
    assert personalized.model is not None and fallback.model is None
    for response, user, version, variant in (
        (personalized, granted, personalized.model.version, personalized.model.variant),
        (fallback, denied, "", "fallback"),
    ):
        key = redis_keys.decision(env.home.namespace, response.request_id)
        stored = {k.decode(): v.decode() for k, v in env.redis.hgetall(key).items()}
        assert stored["u"] == user_key(user)
        assert (stored["v"], stored["var"]) == (version, variant)
        assert stored["items"] == str([i.item_id for i in response.items]).replace(" ", "")
        assert abs(float(stored["at"]) - time.time()) < 60
        assert 0 < env.redis.ttl(key) <= TTL_S


def test_a_project_without_outcomes_indexes_no_decision(
    runtime: ReplicaRuntime, env: Environment
) -> None:
    project = runtime.project
    # The same project with no events declared: nothing would read a decision index.
    runtime.project = dataclasses.replace(
        project, spec=project.spec.model_copy(update={"events": None})
    )
    try:
        pipeline = make_pipeline(runtime)
        assert runtime.recorder.audit.decision_ttl_s is None
        granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
        response = decide(pipeline, granted)
        assert not env.redis.exists(redis_keys.decision(env.home.namespace, response.request_id))
    finally:
        runtime.project = project
        make_pipeline(runtime)  # the runtime indexes decisions again


def test_outcomes_join_their_decision_by_position_and_count_once(
    indexed: RankPipeline, runtime: ReplicaRuntime, env: Environment
) -> None:
    namespace = env.home.namespace
    users = [
        user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=n)
        for n in range(2)
    ]
    answers = [decide(indexed, user, k=4) for user in users]
    model = answers[0].model
    assert model is not None and all(a.model == model for a in answers)
    batch = []
    for user, answer in zip(users, answers, strict=True):
        items = [i.item_id for i in answer.items]
        batch += [event("seen", user, item, answer.request_id) for item in items[:3]]
    first, second = answers[0], answers[1]
    batch += [
        event("tap", users[0], first.items[1].item_id, first.request_id),  # position 2
        event("order", users[0], first.items[1].item_id, first.request_id),
        event("tap", users[1], second.items[0].item_id, second.request_id),  # position 1
        event("browse", users[1], second.items[0].item_id, second.request_id),  # not an outcome
    ]
    join, registry = joiner(runtime, env)
    counts = LOOP.run_until_complete(join.join(batch))
    assert (counts.joined, counts.duplicates, counts.ignored) == (9, 0, 1)
    assert not counts.unjoined
    totals = read_outcomes(env.redis, namespace, model.version, model.variant)
    assert (totals.impressions, totals.clicks, totals.conversions, totals.decisions) == (6, 2, 1, 2)
    assert totals.by_position == {
        1: {"impressions": 2, "clicks": 1},
        2: {"impressions": 2, "clicks": 1, "conversions": 1},
        3: {"impressions": 2},
    }
    # The consumer died before acknowledging: the same batch comes again.
    again = LOOP.run_until_complete(join.join(batch))
    assert (again.joined, again.duplicates) == (0, 9)
    assert read_outcomes(env.redis, namespace, model.version, model.variant) == totals
    # The decision says what joined it.
    decision = redis_keys.decision(namespace, first.request_id)
    assert env.redis.hget(decision, "joined") == b"1"
    recorded = env.redis.hget(decision, marker(batch[6].event_id))
    assert recorded is not None and b'"position":2' in recorded and b'"type":"tap"' in recorded
    labels = {"model_version": model.version, "variant": model.variant}
    sample = registry.get_sample_value
    assert (
        sample("rankgate_outcomes_joined_total", {**labels, "outcome": "click", "position": "2"})
        == 1
    )
    assert (
        sample(
            "rankgate_outcomes_joined_total", {**labels, "outcome": "impression", "position": "3"}
        )
        == 2
    )
    assert sample("rankgate_ctr", labels) == pytest.approx(2 / 6)


def test_outcomes_no_decision_takes_are_counted_as_unjoined(
    indexed: RankPipeline, runtime: ReplicaRuntime, env: Environment
) -> None:
    namespace = env.home.namespace
    user, other = (
        user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=n)
        for n in (2, 3)
    )
    answer = decide(indexed, user, k=3)
    assert answer.model is not None
    shown = {i.item_id for i in answer.items}
    not_shown = next(i for i in indexed.services.fetcher.catalogue if i not in shown)
    batch = [
        event("tap", user, answer.items[0].item_id, uuid.uuid4().hex),  # never decided / expired
        event("tap", user, not_shown, answer.request_id),
        event("seen", other, answer.items[0].item_id, answer.request_id),
        event("seen", user, answer.items[0].item_id, None),
    ]
    join, registry = joiner(runtime, env)
    counts = LOOP.run_until_complete(join.join(batch))
    assert counts.joined == 0
    assert counts.unjoined == {
        Unjoined.UNKNOWN_REQUEST: 1,
        Unjoined.ITEM_NOT_SHOWN: 1,
        Unjoined.OTHER_USER: 1,
        Unjoined.NO_REQUEST_ID: 1,
    }
    assert read_unjoined(env.redis, namespace) == {
        "click:unknown_request": 1,
        "click:item_not_shown": 1,
        "impression:other_user": 1,
        "impression:no_request_id": 1,
    }
    assert (
        registry.get_sample_value(
            "rankgate_outcomes_unjoined_total", {"outcome": "click", "reason": "item_not_shown"}
        )
        == 1
    )
    totals = read_outcomes(env.redis, namespace, answer.model.version, answer.model.variant)
    assert (totals.impressions, totals.clicks, totals.decisions) == (0, 0, 0)
    assert env.redis.hget(redis_keys.decision(namespace, answer.request_id), "joined") is None


def test_an_outcome_read_before_its_decision_was_written_waits_for_it(
    indexed: RankPipeline, runtime: ReplicaRuntime, env: Environment
) -> None:
    # The decision is written beside its audit record, after the answer: an impression
    # sent at once can reach the consumer first. Read from the stream a moment ago, it
    # is left pending (not counted unjoined) and joins once its decision is there.
    user = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=4)
    answer = decide(indexed, user, k=3)
    decision = redis_keys.decision(env.home.namespace, answer.request_id)
    written = env.redis.hgetall(decision)
    env.redis.delete(decision)  # not written yet
    now_ms = int(time.time() * 1000)
    early = dataclasses.replace(
        event("seen", user, answer.items[0].item_id, answer.request_id), stream_id=f"{now_ms}-0"
    )
    stale = dataclasses.replace(
        event("seen", user, answer.items[0].item_id, answer.request_id),
        stream_id=f"{now_ms - int((LATE_DECISION_S + 1) * 1000)}-0",
    )
    join, _ = joiner(runtime, env)
    counts = LOOP.run_until_complete(join.join([early, stale]))
    assert counts.waiting == [early.stream_id]
    assert counts.unjoined == {Unjoined.UNKNOWN_REQUEST: 1}  # past the wait: unknown
    env.redis.hset(decision, mapping=written)  # the audit writer caught up
    again = LOOP.run_until_complete(join.join([early]))
    assert (again.joined, again.waiting) == (1, [])


def test_a_decision_that_expired_after_its_lookup_is_not_revived(env: Environment) -> None:
    namespace = env.home.namespace
    gone = redis_keys.decision(namespace, uuid.uuid4().hex)
    counters = redis_keys.outcomes(namespace, "v-none", "canary")
    script = env.redis.register_script(JOIN_SCRIPT)
    status = script(keys=[gone, counters], args=[marker("e-1"), "{}", "clicks", "clicks:1"])
    assert status == [-1, 0, 0]
    assert not env.redis.exists(gone) and not env.redis.exists(counters)


def test_model_status_shows_ctr_with_its_interval_per_position(
    indexed: RankPipeline, runtime: ReplicaRuntime, env: Environment
) -> None:
    users = [
        user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=n)
        for n in range(4)
    ]
    batch = []
    for n, user in enumerate(users):
        answer = decide(indexed, user, k=2)
        batch += [event("seen", user, i.item_id, answer.request_id) for i in answer.items]
        if n % 2 == 0:
            batch.append(event("tap", user, answer.items[0].item_id, answer.request_id))
    LOOP.run_until_complete(joiner(runtime, env)[0].join(batch))
    model = indexed.services.router.config.stable
    low, high = wilson_interval(2, 8) or (0.0, 0.0)
    assert low < 2 / 8 < high
    result = CliRunner().invoke(main, ["model", "status"])
    assert result.exit_code == 0, result.output
    line = next(
        row
        for row in result.output.splitlines()
        if row.split()[:2] == [model, "stable"] and "impressions" in row
    )
    assert "impressions 8, clicks 2, CTR 25.00%" in line, result.output
    assert f"[{low:.2%}, {high:.2%}]" in line and "decisions with outcomes 4" in line
    assert "CTR by position  1: 50.0% (2/4)  2: 0.0% (0/4)" in result.output


@pytest.mark.parametrize(("k", "n"), [(0, 10), (2, 8), (10, 10), (38, 10_000), (7, 3), (500, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_the_wilson_interval_is_scipys(k: int, n: int, confidence: float) -> None:
    from scipy.stats import binomtest

    expected = binomtest(min(k, n), n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(k, n, confidence) or (-1.0, -1.0)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
