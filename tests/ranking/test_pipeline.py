"""The scoring pipeline as plain classes, on real Redis, Feast, onnxruntime and SHAP."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from feast.infra.online_stores.redis import RedisOnlineStore

from features.store import repo_config
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.contract.parsing import BadRequest, parse_rank
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import RankRequest, RankResponse
from serving.ranking.pipeline import RankPipeline
from serving.ranking.ranker import Ranker
from serving.runtime import ReplicaRuntime, parse_config
from tests.serving_support import (
    PATIENT_BUDGET_MS,
    copy_with_wrong_width,
    ingress_user_config,
    routing,
    user_with,
)

# One event loop for the module: the async Redis clients stay bound to the loop
# they first ran on, as they do in a serving replica.
LOOP = asyncio.new_event_loop()


def make_pipeline(runtime: ReplicaRuntime, **overrides: Any) -> RankPipeline:
    config = parse_config(ingress_user_config(**overrides))
    models, explainers = runtime.load_models(config)
    ranker = Ranker(models)

    async def score(version: str, matrix: np.ndarray) -> np.ndarray:
        (result,) = ranker.score_batch([(version, matrix)])
        if isinstance(result, Exception):
            raise result
        return result

    pipeline = runtime.build_pipeline(config, models, explainers, score)
    LOOP.run_until_complete(pipeline.warm_up())
    return pipeline


@pytest.fixture(scope="module")
def pipeline(runtime: ReplicaRuntime) -> RankPipeline:
    return make_pipeline(runtime)


def rank(pipeline: RankPipeline, **body: Any) -> RankResponse:
    """An answer to `body`, asked with the patient budget unless it names its own."""
    request = parse_rank(
        json.dumps({"budget_ms": PATIENT_BUDGET_MS, **body}).encode(), pipeline.rules
    )
    return LOOP.run_until_complete(pipeline.rank(request))


def hmget_calls(env: Environment) -> int:
    stats = env.redis.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


def test_granted_user_gets_a_personalized_ranking(pipeline: RankPipeline, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="EU", k=5)
    assert response.fallback is None
    assert response.model is not None and response.model.version == "v2"
    assert response.policy.decision == "personalize"
    assert [i.rank for i in response.items] == [1, 2, 3, 4, 5]
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert 5 not in {i.item_id for i in response.items}  # EU item rule
    assert set(response.timings_ms) == {
        "queued",
        "policy",
        "features",
        "retrieve",
        "rank",
        "explain",
        "total",
    }
    assert response.timings_ms["total"] >= response.timings_ms["features"] > 0


def test_a_budget_spent_in_the_queues_is_answered_at_once_without_reading_consent(
    pipeline: RankPipeline, env: Environment
) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    request = parse_rank(
        json.dumps(
            {"user_id": uid, "purpose": "onsite_personalization", "region": "EU", "budget_ms": 100}
        ).encode(),
        pipeline.rules,
    )

    def reads() -> tuple[int, int]:
        stats = env.redis.info("commandstats")
        return tuple(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("hget", "hmget"))

    before = reads()
    response = LOOP.run_until_complete(pipeline.rank(request, queued_ms=120.0))
    assert response.fallback is not None
    assert (response.fallback.reason, response.fallback.detail) == (
        FallbackReason.BUDGET_EXHAUSTED,
        "queued",
    )
    assert response.model is None and response.items  # the rule-based ranking, item rules kept
    assert 5 not in {i.item_id for i in response.items}
    assert response.timings_ms["queued"] == 120.0 and response.timings_ms["total"] >= 120.0
    assert reads() == before  # neither consent nor features were read


def test_scores_equal_the_native_model_on_the_same_rows(
    pipeline: RankPipeline, env: Environment
) -> None:
    import lightgbm as lgb

    from features.vector import build_matrix
    from rankgate.core.pseudonym import user_key

    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=1)
    candidates = [1, 2, 3, 17, 42]
    response = rank(
        pipeline,
        user_id=uid,
        purpose="onsite_personalization",
        region="US",
        candidates=candidates,
        k=5,
    )
    model = pipeline.services.models.loaded["v2"]
    user = LOOP.run_until_complete(
        pipeline.services.fetcher.fetch_user(user_key(uid), pipeline.services.fields_of["v2"])
    )
    booster = lgb.Booster(model_file=str(env.models.path("v2") / "booster.txt"))
    native = booster.predict(
        build_matrix(model.specs, user.values, pipeline.services.fetcher.items, candidates)
    )
    expected = {c: round(float(s), 6) for c, s in zip(candidates, native, strict=True)}
    for item in response.items:
        assert item.score == pytest.approx(expected[item.item_id], abs=1e-5)


def test_denied_user_gets_the_fallback_and_is_never_looked_up(
    pipeline: RankPipeline, env: Environment
) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    before = hmget_calls(env)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US", k=10)
    assert hmget_calls(env) == before  # no feature-store read at all
    assert response.model is None
    assert response.fallback is not None and response.fallback.reason == FallbackReason.NO_CONSENT
    assert response.fallback.strategy == "popularity"
    assert len(response.items) == 10
    assert response.policy.decision == "non_personalized"
    # A granted user, by contrast, costs one read: every user view the model reads
    # (two here) in one HMGET of the person's hash.
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    before = hmget_calls(env)
    rank(pipeline, user_id=granted, purpose="onsite_personalization", region="US")
    assert hmget_calls(env) == before + 1


def test_unknown_consent_follows_the_region(pipeline: RankPipeline, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.UNKNOWN)
    us = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US")
    eu = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="EU")
    assert us.fallback is None and us.policy.decision == "personalize"
    assert eu.fallback is not None and eu.fallback.reason == FallbackReason.NO_CONSENT


def test_email_needs_explicit_consent_and_never_uses_affinity(
    pipeline: RankPipeline, env: Environment
) -> None:
    unknown = user_with(env.consent, "email_marketing", ConsentState.UNKNOWN)
    response = rank(pipeline, user_id=unknown, purpose="email_marketing", region="US")
    assert response.fallback is not None and response.fallback.reason == FallbackReason.NO_CONSENT

    granted = user_with(env.consent, "email_marketing", ConsentState.GRANTED)
    before = hmget_calls(env)
    response = rank(pipeline, user_id=granted, purpose="email_marketing", region="US", k=80)
    # v2 reads user_item_affinity, which email may not use: v1 serves, reading one view.
    assert response.model is not None and response.model.version == "v1"
    assert hmget_calls(env) == before + 1
    assert not {70, 71, 72, 73} & {i.item_id for i in response.items}  # email item rule


def test_no_permitted_model_degrades(runtime: ReplicaRuntime, env: Environment) -> None:
    pipeline = make_pipeline(runtime, routing=routing("v2"))
    granted = user_with(env.consent, "email_marketing", ConsentState.GRANTED)
    response = rank(pipeline, user_id=granted, purpose="email_marketing", region="US")
    assert (
        response.fallback is not None
        and response.fallback.reason == FallbackReason.NO_PERMITTED_MODEL
    )
    assert response.model is None


def test_fallback_order_is_popularity_with_boosts(pipeline: RankPipeline, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US", k=80)
    fallback = pipeline.services.fallback
    assert [i.item_id for i in response.items] == [
        item for item, _ in fallback.rank(pipeline.services.fetcher.catalogue, 80)
    ]
    boosted = fallback.score_of[17]
    assert boosted == pytest.approx(fallback.scores([17])[0])


def test_unknown_user_with_consent_gets_the_fallback(
    pipeline: RankPipeline, env: Environment
) -> None:
    from rankgate.core.pseudonym import user_key

    env.consent.record(user_key("u-newcomer"), {"onsite_personalization": True}, source="test")
    response = rank(pipeline, user_id="u-newcomer", purpose="onsite_personalization", region="EU")
    assert (
        response.fallback is not None
        and response.fallback.reason == FallbackReason.FEATURES_MISSING
    )
    assert response.fallback.detail == "user_item_affinity,visitor_profile"
    assert len(response.items) == 10
    # The answer names the version the request was routed to, and that it fell back:
    # the contract docs/api.md states (the canary's error rate counts by it).
    assert response.model is not None and response.model.version == "v2"


def test_stale_features_degrade(runtime: ReplicaRuntime, env: Environment) -> None:
    pipeline = make_pipeline(runtime)
    pipeline.services.fetcher = copy_fetcher(pipeline.services.fetcher)
    pipeline.services.fetcher.ttl_s["user_item_affinity"] = 0.001  # older than this is stale
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="EU")
    assert (
        response.fallback is not None and response.fallback.reason == FallbackReason.FEATURES_STALE
    )
    assert response.fallback.detail == "user_item_affinity"


def copy_fetcher(fetcher):  # type: ignore[no-untyped-def]
    import copy

    clone = copy.copy(fetcher)
    clone.ttl_s = dict(fetcher.ttl_s)
    return clone


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A real TCP server that accepts connections and never answers (a hung Redis)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_hung_feature_store_times_out_within_the_budget(
    runtime: ReplicaRuntime, env: Environment, blackhole_port: int
) -> None:
    pipeline = make_pipeline(runtime)
    fetcher = copy_fetcher(pipeline.services.fetcher)
    fetcher.config = repo_config(env.home, f"redis://127.0.0.1:{blackhole_port}/0", serving=True)
    fetcher.online = RedisOnlineStore()
    pipeline.services.fetcher = fetcher
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(
        pipeline, user_id=uid, purpose="onsite_personalization", region="EU", budget_ms=30
    )
    assert (
        response.fallback is not None and response.fallback.reason == FallbackReason.FEATURE_TIMEOUT
    )
    assert 25 <= response.timings_ms["total"] < 200
    assert len(response.items) == 10


def test_unreachable_consent_store_fails_closed(runtime: ReplicaRuntime, env: Environment) -> None:
    import redis.asyncio as aioredis

    pipeline = make_pipeline(runtime)
    pipeline.services.consent.client = aioredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2
    )
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    before = hmget_calls(env)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US")
    assert (
        response.fallback is not None
        and response.fallback.reason == FallbackReason.CONSENT_UNAVAILABLE
    )
    assert hmget_calls(env) == before


@pytest.fixture
def broken_versions(env: Environment) -> Iterator[None]:
    """v1-shape: manifest claims 9 features, its ONNX takes 8 (a real onnxruntime error)."""
    shape = copy_with_wrong_width(env.models, "v1", "v1-shape")
    yield
    shutil.rmtree(shape)


@pytest.mark.usefixtures("broken_versions")
def test_onnx_error_degrades_to_rule_based_order(runtime: ReplicaRuntime, env: Environment) -> None:
    pipeline = make_pipeline(runtime, routing=routing("v1-shape"))
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US")
    assert response.fallback is not None and response.fallback.reason == FallbackReason.MODEL_ERROR
    assert response.model is not None and response.model.version == "v1-shape"  # the skipped model
    assert len(response.items) == 10


def test_missing_model_file_degrades(runtime: ReplicaRuntime, env: Environment) -> None:
    pipeline = make_pipeline(runtime, routing=routing("v404"))
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US")
    assert (
        response.fallback is not None
        and response.fallback.reason == FallbackReason.MODEL_UNAVAILABLE
    )
    assert "v404" in (response.fallback.detail or "")


def test_explain_returns_reasons_for_returned_items(
    pipeline: RankPipeline, env: Environment
) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(
        pipeline,
        user_id=uid,
        purpose="onsite_personalization",
        region="US",
        k=3,
        explain=True,
    )
    assert response.explanation is not None and response.explanation.status == "explained"
    for item in response.items:
        assert item.reasons is not None
        for reason in item.reasons:
            assert reason.contribution > 0 and reason.text
            assert reason.group in {"profile", "affinity", "item"}
    assert response.timings_ms["explain"] > 0


def test_explainer_is_omitted_when_the_budget_cannot_cover_it(
    runtime: ReplicaRuntime, env: Environment
) -> None:
    # 10 rows at an estimated 500 ms each: more than the largest budget covers.
    pipeline = make_pipeline(runtime, explainer={"max_items": 10, "ms_per_row_estimate": 500})
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(
        pipeline, user_id=uid, purpose="onsite_personalization", region="US", explain=True
    )
    assert response.fallback is None
    assert response.explanation is not None and response.explanation.reason == "budget_exhausted"
    assert all(item.reasons is None for item in response.items)


def test_missing_booster_makes_the_explainer_unavailable_not_the_answer(
    runtime: ReplicaRuntime, env: Environment
) -> None:
    copy = env.models.path("v1-nobooster")
    shutil.copytree(env.models.path("v1"), copy)
    try:
        (copy / "booster.txt").unlink()  # hashes now fail: the version does not load
        pipeline = make_pipeline(runtime, routing=routing("v1"))
        pipeline.services.explainers = {}
        uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
        response = rank(
            pipeline, user_id=uid, purpose="onsite_personalization", region="US", explain=True
        )
        assert response.fallback is None
        assert (
            response.explanation is not None
            and response.explanation.reason == "explainer_unavailable"
        )
    finally:
        shutil.rmtree(copy)


def test_a_tiny_budget_still_answers(pipeline: RankPipeline, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = rank(
        pipeline, user_id=uid, purpose="onsite_personalization", region="US", budget_ms=1
    )
    assert len(response.items) == 10
    if response.fallback is not None:
        assert response.fallback.reason in {
            FallbackReason.FEATURE_TIMEOUT,
            FallbackReason.BUDGET_EXHAUSTED,
            FallbackReason.CONSENT_UNAVAILABLE,
        }


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"purpose": "telepathy"}, "purpose", "unknown purpose"),
        ({"region": "MARS"}, "region", "unknown region"),
        ({"k": 0}, "k", "between 1 and 100"),
        ({"k": "10"}, "k", "Input should be a valid integer"),
        ({"budget_ms": 5000}, "budget_ms", "between 1 and 1000 ms"),
        ({"candidates": list(range(501))}, "candidates", "between 1 and 500 item ids"),
        ({"candidates": [1, 1]}, "candidates", "distinct"),
        ({"candidates": [1, 999]}, "candidates", "unknown item ids: 999"),
        ({"candidates": [True]}, "candidates.0", "valid integer"),
        ({"user_id": "bad id!"}, "user_id", "letters, digits"),
        ({"user_id": "u" * 200}, "user_id", "at most 128 characters"),
        ({"user_id": "u-1\n"}, "user_id", "letters, digits"),
        ({"k": 2.5}, "k", "valid integer"),
        ({"context": {"channel\n": "x"}}, "context", "lower-case"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"context": {"Bad-Key": "x"}}, "context", "lower-case"),
        ({"explain": "yes"}, "explain", "valid boolean"),
    ],
)
def test_bad_input_names_the_field(
    pipeline: RankPipeline, body: dict[str, Any], field: str, problem: str
) -> None:
    request = {"user_id": "u-1", "purpose": "onsite_personalization", "region": "EU", **body}
    with pytest.raises(BadRequest) as caught:
        parse_rank(json.dumps(request).encode(), pipeline.rules)
    assert any(p.field == field and problem in p.problem for p in caught.value.problems), (
        caught.value.problems
    )


def test_missing_fields_and_broken_json(pipeline: RankPipeline) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_rank(b'{"user_id": "u-1"}', pipeline.rules)
    assert {p.field for p in caught.value.problems} == {"purpose", "region"}
    with pytest.raises(BadRequest) as caught:
        parse_rank(b'{"user_id": ', pipeline.rules)
    assert caught.value.problems[0].field == "body"


def test_schema_and_policy_problems_come_together(pipeline: RankPipeline) -> None:
    body = {"user_id": "u-1", "purpose": "newsletter", "region": "FR", "k": 0}
    with pytest.raises(BadRequest) as caught:
        parse_rank(json.dumps(body).encode(), pipeline.rules)
    assert [p.field for p in caught.value.problems] == ["purpose", "region", "k"]


def test_integral_floats_are_parsed_as_integers(pipeline: RankPipeline) -> None:
    body = {"user_id": "u-1", "purpose": "onsite_personalization", "region": "EU"}
    request = parse_rank(
        json.dumps({**body, "k": 3.0, "candidates": [4.0, 7]}).encode(), pipeline.rules
    )
    assert (request.k, request.candidates) == (3, [4, 7])
    assert all(type(n) is int for n in [request.k, *request.candidates])


def test_the_rules_are_the_pipelines_config_and_policy(runtime: ReplicaRuntime) -> None:
    limits = {**ingress_user_config()["limits"], "max_k": 20}
    pipeline = make_pipeline(runtime, limits=limits)
    assert pipeline.rules.limits.max_k == 20
    assert pipeline.rules.regions == tuple(sorted(pipeline.services.gate.policy.regions))
    assert pipeline.rules.items == frozenset(pipeline.services.fetcher.catalogue)
    body = {"user_id": "u-1", "purpose": "onsite_personalization", "region": "EU", "k": 21}
    with pytest.raises(BadRequest) as caught:
        parse_rank(json.dumps(body).encode(), pipeline.rules)
    assert [(p.field, p.problem) for p in caught.value.problems] == [("k", "between 1 and 20")]


def test_request_schema_is_one_model() -> None:
    assert RankRequest.model_json_schema()["additionalProperties"] is False


def test_item_table_is_cached_and_refreshed_from_the_online_store(runtime: ReplicaRuntime) -> None:
    fetcher = copy_fetcher(runtime.fetcher)
    cached = fetcher.items

    async def refresh() -> None:
        task = fetcher.refresh_items_if_due(every_s=3600)
        if task is not None:
            await task

    LOOP.run_until_complete(refresh())
    assert fetcher.items is cached  # not due: no read
    fetcher.items_loaded_at -= 3601
    LOOP.run_until_complete(refresh())
    assert fetcher.items is not cached
    assert fetcher.items.digest == cached.digest and fetcher.items.item_ids == cached.item_ids


# -- explanations on a sample of traffic ----------------------------------------------

SAMPLE_ALL = {"max_items": 10, "ms_per_row_estimate": 1.0, "sample_rate": 1.0, "sample_queue": 64}


def records_of(pipeline: RankPipeline, env: Environment, request_ids: list[str]) -> list[Any]:
    from serving.ops import audit_replay as replay

    assert LOOP.run_until_complete(pipeline.recorder.audit.flush())
    found = {r.request_id: r for r in replay.tail(env.redis, env.home.namespace, 2000)}
    return [found[rid] for rid in request_ids]


def test_sampled_explanations_go_to_the_audit_record_not_the_answer(
    runtime: ReplicaRuntime, env: Environment
) -> None:
    pipeline = make_pipeline(runtime, explainer=SAMPLE_ALL)
    seen: list[tuple[str, tuple[int, ...]]] = []

    def observer(version: str, contributions: np.ndarray) -> None:
        seen.append((version, contributions.shape))

    pipeline.recorder.observers.append(observer)
    try:
        uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=2)
        body = {"user_id": uid, "purpose": "onsite_personalization", "region": "US", "k": 12}
        answers = [rank(pipeline, **body) for _ in range(3)]
        asked = rank(pipeline, **body, explain=True)
        denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
        refused = rank(pipeline, **{**body, "user_id": denied})
        records = records_of(pipeline, env, [a.request_id for a in [*answers, asked, refused]])
    finally:
        pipeline.recorder.observers.remove(observer)
    assert all(item.reasons is None for a in answers for item in a.items)
    assert all(a.explanation is None for a in answers)
    given = [item.reasons or [] for item in asked.items]
    assert len(given) == 12 and given[:10] and given[10:] == [[], []]  # max_items: 10
    for record in records[:3]:
        assert record.explained is not None
        assert (record.explained.kind, record.explained.status) == ("sampled", "explained")
        assert record.explanation == given  # the same rows, the same reasons as asked for
    assert records[3].explained is not None and records[3].explained.kind == "requested"
    assert records[3].explanation == given
    # No model ranked the refused person: nothing to explain, nothing said about it.
    assert records[4].fallback is not None and records[4].explained is None
    assert records[4].explanation is None
    # Each explanation of the sample, the one asked for included, reaches the observers.
    width = len(pipeline.services.models.loaded["v2"].specs)
    assert seen == [("v2", (10, width))] * 4


def test_a_sample_that_cannot_be_explained_still_writes_its_record(
    runtime: ReplicaRuntime, env: Environment
) -> None:
    pipeline = make_pipeline(runtime, explainer=SAMPLE_ALL)
    pipeline.services.explainers = {}
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=2)
    response = rank(pipeline, user_id=uid, purpose="onsite_personalization", region="US")
    (record,) = records_of(pipeline, env, [response.request_id])
    assert record.explanation is None and record.explained is not None
    assert record.explained.model_dump(exclude_unset=True) == {
        "kind": "sampled",
        "status": "omitted",
        "reason": "explainer_unavailable",
    }
