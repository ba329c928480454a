"""Canary routing: sticky assignment, config refusal, shadow scoring, automatic rollback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError
from rankgate.core.pseudonym import user_key
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.contract.config import RoutingConfig
from serving.observe.outcomes import Exposure, read_outcomes
from serving.observe.routing_log import RoutingLog, read_rollbacks, read_shadow
from serving.ops.promotion import reset_canary_outcomes, starts_experiment
from serving.ranking.routing import Router
from serving.runtime import parse_config
from tests.ranking.test_pipeline import LOOP, make_pipeline, rank
from tests.serving_support import (
    copy_with_wrong_width,
    example_user_ids,
    ingress_user_config,
    routing,
    user_with,
)

KEYS = [user_key(f"u-{n}") for n in range(10_000)]


def config(**kwargs: Any) -> RoutingConfig:
    return RoutingConfig.model_validate(routing(**kwargs))


def test_assignment_is_sticky_across_replicas_and_restarts() -> None:
    first, second = (
        Router(config(stable="v2", canary="v1", weight=10)),
        Router(config(stable="v2", canary="v1", weight=10)),
    )
    assert [first.assign(k) for k in KEYS] == [second.assign(k) for k in KEYS]


def test_raising_the_canary_weight_only_moves_users_into_the_canary() -> None:
    at_10 = Router(config(stable="v2", canary="v1", weight=10))
    at_20 = Router(config(stable="v2", canary="v1", weight=20))
    before = {k for k in KEYS if at_10.assign(k).variant == "canary"}
    after = {k for k in KEYS if at_20.assign(k).variant == "canary"}
    assert before <= after  # nobody leaves the canary
    assert 0.08 < len(before) / len(KEYS) < 0.12 and 0.18 < len(after) / len(KEYS) < 0.22


def test_the_salt_reshuffles_assignment() -> None:
    a = Router(config(stable="v2", canary="v1", weight=50))
    b = Router(
        RoutingConfig.model_validate(
            {**routing(stable="v2", canary="v1", weight=50), "salt": "other"}
        )
    )
    assert sum(a.assign(k) != b.assign(k) for k in KEYS) > 3000


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        (
            [
                {"version": "v2", "role": "stable", "weight": 90},
                {"version": "v1", "role": "canary", "weight": 20},
            ],
            "add up to 100",
        ),
        (
            [{"version": "v2", "role": "stable"}, {"version": "v1", "role": "stable"}],
            "exactly one stable version, got 2 stables",
        ),
        ([{"version": "v1", "role": "canary", "weight": 100}], "a canary without a stable"),
        (
            [{"version": "v2", "role": "stable"}, {"version": "v2", "role": "shadow"}],
            "'v2' is listed twice",
        ),
        (
            [{"version": "v2", "role": "stable"}, {"version": "v1", "role": "shadow", "weight": 5}],
            "takes no weight",
        ),
        ([{"version": "v2", "role": "boss"}], "routing.versions.0.role"),
    ],
)
def test_bad_routing_is_refused_naming_the_field(
    versions: list[dict[str, Any]], message: str
) -> None:
    bad = ingress_user_config(routing={"salt": "s", "versions": versions})
    with pytest.raises(ConfigError, match="routing") as caught:
        parse_config(bad)
    assert message in caught.value.message


def test_unknown_version_is_refused(env: Environment) -> None:
    with pytest.raises(
        ConfigError, match=r"routing.versions.1.version': unknown model version 'v9'"
    ):
        parse_config(ingress_user_config(routing=routing("v2", canary="v9", weight=10)), env.models)
    assert parse_config(ingress_user_config(), env.models).routing.stable == "v2"


def test_rollback_rules_fire_only_with_enough_evidence() -> None:
    rules = {
        "window_s": 30,
        "min_requests": 20,
        "max_error_rate_delta": 0.05,
        "max_degraded_rate_delta": 0.1,
        "max_p99_ratio": 2.0,
        "min_p99_delta_ms": 5,
    }
    router = Router(
        RoutingConfig.model_validate({**routing("v2", canary="v1", weight=10), "rollback": rules})
    )
    for n in range(19):
        router.record("v1", error=True, degraded=True, latency_ms=5, now=n * 0.1)
        router.record("v2", error=False, degraded=False, latency_ms=5, now=n * 0.1)
    assert router.check_rollback(now=2.0) is None  # 19 < min_requests
    router.record("v1", error=True, degraded=True, latency_ms=5, now=2.0)
    router.record("v2", error=False, degraded=False, latency_ms=5, now=2.0)
    event = router.check_rollback(now=2.0)
    assert event is not None and event.rule == "error_rate" and event.version == "v1"
    assert event.canary["error_rate"] == 1.0 and event.stable["error_rate"] == 0.0
    assert router.canary_weight == 0 and all(
        router.assign(k).variant == "stable" for k in KEYS[:500]
    )
    assert router.check_rollback(now=2.0) is None  # once


def test_a_slow_canary_fires_the_latency_rule() -> None:
    router = Router(
        RoutingConfig.model_validate(
            {**routing("v2", canary="v1", weight=10), "rollback": {"min_requests": 30}}
        )
    )
    for n in range(40):
        router.record("v1", error=False, degraded=False, latency_ms=40, now=n * 0.1)
        router.record("v2", error=False, degraded=False, latency_ms=4, now=n * 0.1)
    event = router.check_rollback(now=4.0)
    assert event is not None and event.rule == "p99_latency"


def test_old_outcomes_leave_the_window() -> None:
    router = Router(
        RoutingConfig.model_validate(
            {
                **routing("v2", canary="v1", weight=10),
                "rollback": {"window_s": 10, "min_requests": 5},
            }
        )
    )
    for n in range(10):
        router.record("v1", error=True, degraded=True, latency_ms=5, now=n)
        router.record("v2", error=False, degraded=False, latency_ms=5, now=n)
    assert router.check_rollback(now=100.0) is None  # all older than the window


# -- in the pipeline, on real Redis and onnxruntime ---------------------------


@pytest.fixture
def raising_version(env: Environment) -> Iterator[str]:
    """v1-raises: manifest says 9 features, its ONNX takes 8: every call raises."""
    target = copy_with_wrong_width(env.models, "v1", "v1-raises")
    env.redis.delete(
        redis_keys.rollbacks(env.home.namespace), redis_keys.shadow(env.home.namespace, "v1-raises")
    )
    yield "v1-raises"
    shutil.rmtree(target)
    env.redis.delete(redis_keys.rollbacks(env.home.namespace))


def drain(pipeline) -> None:  # type: ignore[no-untyped-def]
    async def wait() -> None:
        import asyncio

        while pipeline.canary.background:
            await asyncio.gather(*list(pipeline.canary.background))

    LOOP.run_until_complete(wait())


def test_users_without_consent_never_enter_the_experiment(runtime, env: Environment) -> None:  # type: ignore[no-untyped-def]
    pipeline = make_pipeline(runtime, routing=routing("v2", canary="v1", weight=100))
    denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    assert (
        rank(pipeline, user_id=denied, purpose="onsite_personalization", region="US").model is None
    )
    answer = rank(pipeline, user_id=granted, purpose="onsite_personalization", region="US").model
    assert answer is not None and answer.variant == "canary" and answer.version == "v1"


def test_the_canary_falls_back_to_stable_or_alternate_where_the_purpose_forbids_it(
    runtime, env: Environment
) -> None:  # type: ignore[no-untyped-def]
    pipeline = make_pipeline(runtime, routing=routing("v1", canary="v2", weight=100))
    granted = user_with(env.consent, "email_marketing", ConsentState.GRANTED)
    model = rank(pipeline, user_id=granted, purpose="email_marketing", region="US").model
    assert model is not None and (model.version, model.variant) == ("v1", "stable")
    pipeline = make_pipeline(runtime, routing=routing("v2", alternate=["v1"]))
    model = rank(pipeline, user_id=granted, purpose="email_marketing", region="US").model
    assert model is not None and (model.version, model.variant) == ("v1", "alternate")


def test_shadow_scores_off_the_path_and_records_agreement(
    runtime, env: Environment, raising_version: str
) -> None:  # type: ignore[no-untyped-def]
    namespace = env.home.namespace
    env.redis.delete(redis_keys.shadow(namespace, "v1"))
    pipeline = make_pipeline(runtime, routing=routing("v2", shadow=["v1", raising_version]))
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    for _ in range(5):
        response = rank(pipeline, user_id=granted, purpose="onsite_personalization", region="US")
        assert response.fallback is None and response.model is not None
        assert (response.model.version, response.model.variant) == ("v2", "stable")
    drain(pipeline)
    agreement = read_shadow(env.redis, namespace, "v1")
    assert agreement["requests"] == 5 and agreement["errors"] == 0
    assert 0 <= agreement["mean_topk_overlap"] <= 1 and agreement["mean_abs_score_diff"] >= 0
    broken = read_shadow(env.redis, namespace, raising_version)
    assert broken["requests"] == 5 and broken["errors"] == 5  # and no answer noticed


def test_a_raising_canary_is_rolled_back_and_recorded(
    runtime, env: Environment, raising_version: str
) -> None:  # type: ignore[no-untyped-def]
    section = {
        **routing("v2", canary=raising_version, weight=50),
        "rollback": {"window_s": 60, "min_requests": 10, "max_error_rate_delta": 0.05},
    }
    pipeline = make_pipeline(runtime, routing=section)
    # Known users an opt-out region may personalize (consent granted or no objection).
    states = env.consent.states([user_key(u) for u in example_user_ids()], "onsite_personalization")
    ids = [u for u, s in zip(example_user_ids(), states, strict=True) if s != ConsentState.DENIED]
    degraded_canary = 0
    answers = []
    for uid in ids:
        response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US")
        answers.append(response)
        if (
            response.model is not None
            and response.model.variant == "canary"
            and response.fallback is not None
        ):
            degraded_canary += 1
    drain(pipeline)
    assert pipeline.services.router.rolled_back == {raising_version}
    # Only the canary users served before the rule had its minimum sample were degraded.
    assert 10 <= degraded_canary <= 30, degraded_canary
    tail = answers[-100:]
    assert all(
        r.model is not None and r.model.variant == "stable" and r.fallback is None for r in tail
    )
    fired = runtime.metrics.registry.get_sample_value(
        "rankgate_rollbacks_total", {"model_version": raising_version, "rule": "error_rate"}
    )
    assert fired == 1
    weight = runtime.metrics.registry.get_sample_value(
        "rankgate_canary_weight_percent", {"model_version": raising_version}
    )
    assert weight == 0
    record = read_rollbacks(env.redis, env.home.namespace)[raising_version]
    assert record["rule"] == "error_rate" and record["canary"]["requests"] >= 10
    # A new replica (or a restart) learns the rollback from Redis.
    fresh = make_pipeline(runtime, routing=section)
    assert fresh.services.router.rolled_back == {raising_version}


# -- the click-rate rule --------------------------------------------------------


def ctr_router(**rules: Any) -> Router:
    return Router(
        RoutingConfig.model_validate(
            {**routing("v2", canary="v1", weight=50), "rollback": {"min_impressions": 500, **rules}}
        )
    )


def test_the_ctr_rule_fires_on_a_significantly_lower_canary_click_rate() -> None:
    router = ctr_router(ctr_p_value=0.05)
    # 3 % vs 5 % over 499 impressions: below the minimum exposure, nothing fires.
    assert router.check_ctr(Exposure(499, 15), Exposure(2000, 100), now=1.0) is None
    # A lower rate that a one-sided test cannot tell from chance does not fire either.
    assert router.check_ctr(Exposure(600, 27), Exposure(600, 30), now=1.0) is None
    # Nor does a better canary.
    assert router.check_ctr(Exposure(2000, 200), Exposure(2000, 100), now=1.0) is None
    event = router.check_ctr(Exposure(1000, 30), Exposure(1200, 60), now=1.0)
    assert event is not None and (event.version, event.rule) == ("v1", "ctr")
    assert (event.canary["impressions"], event.canary["clicks"]) == (1000, 30)
    assert (event.stable["impressions"], event.stable["clicks"]) == (1200, 60)
    assert event.canary["ctr"] == 0.03 and event.stable["ctr"] == 0.05
    assert 0 < event.canary["p_value"] < 0.05
    assert "canary CTR 3.00% (30/1000) vs stable 5.00% (60/1200)" in event.detail
    assert "requests" in event.canary  # the windows' figures come along
    assert router.canary_weight == 0
    assert router.check_ctr(Exposure(1000, 0), Exposure(1200, 60), now=1.0) is None  # once


def test_the_ctr_rule_needs_the_minimum_on_both_sides_and_can_be_turned_off() -> None:
    assert ctr_router().check_ctr(Exposure(5000, 0), Exposure(499, 100)) is None
    assert ctr_router(ctr_p_value=None).check_ctr(Exposure(5000, 0), Exposure(5000, 500)) is None
    # The default significance is 0.05, and the rule does not wait for the request windows.
    event = ctr_router().check_ctr(Exposure(5000, 0), Exposure(5000, 500))
    assert event is not None and event.canary["requests"] == 0


def test_clicks_reported_without_their_impressions_do_not_break_the_test() -> None:
    event = ctr_router().check_ctr(Exposure(500, 600), Exposure(500, 100))
    assert event is None  # capped at one click per impression: the canary is not worse


@pytest.fixture
def outcome_counters(env: Environment) -> Iterator[dict[str, str]]:
    namespace = env.home.namespace
    keys = {
        "canary": redis_keys.outcomes(namespace, "v1", "canary"),
        "stable": redis_keys.outcomes(namespace, "v2", "stable"),
    }
    env.redis.delete(redis_keys.rollbacks(namespace), *keys.values())
    yield keys
    env.redis.delete(redis_keys.rollbacks(namespace), *keys.values())


def test_the_pipeline_rolls_a_canary_with_fewer_clicks_back_from_the_counters(
    runtime, env: Environment, outcome_counters: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    section = {
        **routing("v2", canary="v1", weight=50),
        "rollback": {"min_impressions": 200, "ctr_p_value": 0.01},
    }
    pipeline = make_pipeline(runtime, routing=section)
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    # What the event consumer keeps (serving/observe/outcomes.py): stable gets 10 % clicks.
    env.redis.hset(outcome_counters["stable"], mapping={"impressions": 400, "clicks": 40})
    env.redis.hset(outcome_counters["canary"], mapping={"impressions": 150, "clicks": 1})
    pipeline.canary.synced_at = pipeline.canary.checked_at = 0.0  # due now
    rank(pipeline, user_id=granted, purpose="onsite_personalization", region="US")
    drain(pipeline)
    assert pipeline.services.router.rolled_back == set()  # 150 canary impressions: too few
    env.redis.hset(outcome_counters["canary"], mapping={"impressions": 300, "clicks": 3})
    pipeline.canary.synced_at = pipeline.canary.checked_at = 0.0  # due now
    rank(pipeline, user_id=granted, purpose="onsite_personalization", region="US")
    drain(pipeline)
    assert pipeline.services.router.rolled_back == {"v1"}
    recorded = read_rollbacks(env.redis, env.home.namespace)["v1"]
    assert recorded["rule"] == "ctr" and "1.00% (3/300)" in recorded["detail"]
    assert recorded["canary"]["clicks"] == 3 and recorded["stable"]["impressions"] == 400
    fired = runtime.metrics.registry.get_sample_value(
        "rankgate_rollbacks_total", {"model_version": "v1", "rule": "ctr"}
    )
    assert fired is not None and fired >= 1


def test_a_new_canary_counts_from_zero_and_stable_from_where_it_stood(
    runtime, env: Environment, outcome_counters: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    namespace = env.home.namespace
    env.redis.hset(outcome_counters["canary"], mapping={"impressions": 900, "clicks": 2})
    env.redis.hset(outcome_counters["stable"], mapping={"impressions": 5000, "clicks": 500})
    before = config(stable="v2", canary="v1", weight=10)
    assert not starts_experiment(before, "v1", set())  # a new weight, the same experiment
    assert starts_experiment(before, "v1", {"v1"})  # rolled back: a new one
    assert starts_experiment(config(stable="v2"), "v1", set())
    reset_canary_outcomes(env.redis, namespace, "v1", "v2")
    env.redis.hincrby(outcome_counters["stable"], "impressions", 300)
    env.redis.hincrby(outcome_counters["stable"], "clicks", 15)
    canary = read_outcomes(env.redis, namespace, "v1", "canary")
    stable = read_outcomes(env.redis, namespace, "v2", "stable")
    assert canary.exposure == Exposure(0, 0)
    assert stable.since(canary) == Exposure(300, 15)
    log = RoutingLog(runtime.redis, namespace)  # as the pipeline reads them
    assert LOOP.run_until_complete(log.exposures("v1", "v2")) == (Exposure(0, 0), Exposure(300, 15))
