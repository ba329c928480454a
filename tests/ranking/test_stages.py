"""The stages and their runner in memory: every degradation path, deadline accounting.

The dependencies are small in-memory stand-ins (a consent store, a feature store,
a model set, a scorer, an explainer, a fallback ranking); the runner, the stages,
the gate, the router, the feature-vector builder and top-k are the real ones.
Nothing here starts a server, so the whole file runs in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest

from features.spec import FeatureSpec
from features.vector import ItemTable
from rankgate.core.topk import top_k
from rankgate.governance.consent import ConsentState, PersonConsent
from rankgate.governance.policy import Policy
from serving.contract.config import BudgetConfig, ServingConfig
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import RankRequest
from serving.observe.metrics import ServingMetrics
from serving.ranking.feature_fetch import UserFeatures
from serving.ranking.gate import ConsentGate
from serving.ranking.ranker import ModelUnavailable
from serving.ranking.routing import Router
from serving.ranking.stages import (
    COMPLETED,
    Deadline,
    RankContext,
    Services,
    Stage,
    StageResult,
    StageRunner,
)

CATALOGUE = [1, 2, 3, 4, 5, 6]
USER = "u-1"
PURPOSE = "onsite"
SPECS = [
    FeatureSpec("price", "item", "items", "price", "number", "item"),
    FeatureSpec("age", "user", "profile", "age", "number", "profile"),
]
POLICY = Policy.model_validate(
    {
        "version": "test",
        "regions": {"EU": {"regime": "opt_in"}, "US": {"regime": "opt_out"}},
        "purposes": {PURPOSE: {"explicit_consent": False, "feature_views": ["profile"]}},
        "item_rules": [{"name": "no six", "items": [6]}],
    }
)
DEFAULT_STAGES = ServingConfig.model_fields["pipeline"].default.stages


# -- in-memory dependencies ------------------------------------------------------


@dataclass
class Consent:
    state: ConsentState | None = ConsentState.GRANTED
    delay_s: float = 0.0

    async def read_person(self, key: str, purpose: str, timeout_s: float) -> PersonConsent | None:
        """The id is its own person (linking is tested against Redis: test_identity)."""
        if self.delay_s > timeout_s:
            await asyncio.sleep(max(timeout_s, 0.0))
            return None
        return None if self.state is None else PersonConsent(key, self.state)


@dataclass
class Features:
    values: dict[str, Any] = field(default_factory=lambda: {"age": 30.0})
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    error: Exception | None = None
    delay_s: float = 0.0
    items: ItemTable = field(
        default_factory=lambda: ItemTable({i: {"price": i} for i in CATALOGUE})
    )
    catalogue: list[int] = field(default_factory=lambda: list(CATALOGUE))

    async def fetch_user(self, key: str, fields: Any) -> UserFeatures:
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return UserFeatures(self.values, {"profile": 60.0}, self.missing, self.stale)


@dataclass
class Model:
    specs: list[FeatureSpec] = field(default_factory=lambda: list(SPECS))


@dataclass
class Models:
    name: str = "ranker"
    loaded: dict[str, Model] = field(default_factory=lambda: {"v1": Model()})
    errors: dict[str, str] = field(default_factory=dict)
    views_of: dict[str, frozenset[str] | None] = field(
        default_factory=lambda: {"v1": frozenset({"profile"})}
    )


@dataclass
class Scorer:
    """Scores by price (the first column), after `delay_s`, or raises `error`."""

    error: Exception | None = None
    delay_s: float = 0.0
    calls: int = 0

    async def __call__(self, version: str, matrix: np.ndarray) -> np.ndarray:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return matrix[:, 0] / 10.0


class Explainer:
    """Contributions are the inputs themselves; the reason names the price."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def contributions(self, rows: np.ndarray, threads: int | None = None) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return rows.astype(float)

    def reasons(self, values: np.ndarray) -> list[list]:
        return [[f"price {row[0]:g}"] for row in values]


class Fallback:
    strategy = "static"

    def rank(self, item_ids: Sequence[int], k: int) -> list[tuple[int, float]]:
        """Lowest id first: tells a fallback answer from the model's (highest price first)."""
        picks = top_k(item_ids, [-float(i) for i in item_ids], k)
        return [(pick.item_id, pick.score) for pick in picks]

    rank_many = rank


def services(**overrides: Any) -> Services:
    config = ServingConfig.model_validate(
        {
            "routing": {"salt": "s", "versions": [{"version": "v1", "role": "stable"}]},
            **overrides.pop("config", {}),
        }
    )
    parts: dict[str, Any] = {
        "config": config,
        "gate": ConsentGate(POLICY),
        "consent": Consent(),
        "fetcher": Features(),
        "models": Models(),
        "router": Router(config.routing),
        "score": Scorer(),
        "explainers": {"v1": Explainer()},
        "fallback": Fallback(),
        "metrics": METRICS,
        "fields_of": {"v1": {"profile": ["age"]}},
    }
    return Services(**(parts | overrides))


METRICS = ServingMetrics()
PATIENT_BUDGET_MS = BudgetConfig().max_ms
"""What a run asks with unless the test is about budgets: the largest budget, so
that a busy machine's scheduling never turns an answer into a fallback."""


def run(
    deps: Services,
    *,
    budget_ms: float = PATIENT_BUDGET_MS,
    queued_ms: float = 0.0,
    region: str = "EU",
    explain: bool = False,
    stages: Sequence[str] = DEFAULT_STAGES,
    k: int = 3,
) -> RankContext:
    runner = StageRunner.build(stages, "rules", deps)
    request = RankRequest.model_construct(
        user_id=USER, purpose=PURPOSE, region=region, k=k, context={}, explain=explain
    )
    context = RankContext(
        request=request,
        key="key-1",
        candidates=deps.fetcher.catalogue,
        timings=runner.timings(queued_ms),
    )
    asyncio.run(runner.run(context, Deadline(budget_ms, queued_ms)))
    return context


def fallback_of(context: RankContext) -> tuple[str, str | None] | None:
    if context.fallback is None:
        return None
    return context.fallback.reason, context.fallback.detail


# -- the answers -----------------------------------------------------------------


def test_a_granted_person_gets_the_models_top_k_of_the_eligible_items() -> None:
    context = run(services(), explain=True)
    assert context.fallback is None
    assert [item for item, _ in context.ranked] == [5, 4, 3]  # 6 is excluded by the policy
    assert context.eligible == [1, 2, 3, 4, 5]
    assert context.model_ref is not None and context.model_ref.version == "v1"
    assert context.explanation is not None and context.explanation.status == "explained"
    assert context.reasons == [["price 5"], ["price 4"], ["price 3"]]
    assert list(context.timings) == ["queued", "policy", "features", "retrieve", "rank", "explain"]
    assert all(context.timings[key] > 0 for key in ("policy", "features", "rank", "explain"))


@pytest.mark.parametrize(
    ("deps", "expected"),
    [
        (services(consent=Consent(ConsentState.DENIED)), (FallbackReason.NO_CONSENT, None)),
        (services(consent=Consent(None)), (FallbackReason.CONSENT_UNAVAILABLE, None)),
        (
            services(consent=Consent(delay_s=1.0)),
            (FallbackReason.CONSENT_UNAVAILABLE, None),
        ),
        (
            services(models=Models(views_of={"v1": frozenset({"secret"})})),
            (FallbackReason.NO_PERMITTED_MODEL, None),
        ),
        (
            services(models=Models(loaded={}, errors={"v1": "hash mismatch"})),
            (FallbackReason.MODEL_UNAVAILABLE, "hash mismatch"),
        ),
        (
            services(fetcher=Features(missing=["profile"])),
            (FallbackReason.FEATURES_MISSING, "profile"),
        ),
        (
            services(fetcher=Features(stale=["profile"])),
            (FallbackReason.FEATURES_STALE, "profile"),
        ),
        (
            services(fetcher=Features(error=ConnectionError("down"))),
            (FallbackReason.FEATURE_ERROR, "ConnectionError"),
        ),
        (services(fetcher=Features(delay_s=1.0)), (FallbackReason.FEATURE_TIMEOUT, None)),
        (
            services(score=Scorer(error=ModelUnavailable("not loaded"))),
            (FallbackReason.MODEL_UNAVAILABLE, "not loaded"),
        ),
        (
            services(score=Scorer(error=RuntimeError("onnx"))),
            (FallbackReason.MODEL_ERROR, "RuntimeError"),
        ),
        (services(score=Scorer(delay_s=1.0)), (FallbackReason.BUDGET_EXHAUSTED, "ranker")),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else None,
)
def test_each_degradation_is_the_fallback_with_its_reason(
    deps: Services, expected: tuple[FallbackReason, str | None]
) -> None:
    context = run(deps, budget_ms=20, explain=True)
    assert fallback_of(context) == expected
    assert context.fallback is not None and context.fallback.strategy == "static"
    assert [item for item, _ in context.ranked] == [1, 2, 3]  # the fallback's order
    assert context.reasons is None
    assert context.explanation is not None
    assert (context.explanation.status, context.explanation.reason) == (
        "omitted",
        "not_personalized",
    )


def test_a_budget_spent_in_the_queues_answers_at_once_without_reading_consent() -> None:
    consent = Consent(delay_s=10.0)  # reading it would time out: it must not be read
    deps = services(consent=consent)
    started = time.perf_counter()
    context = run(deps, budget_ms=50, queued_ms=60)
    assert time.perf_counter() - started < 0.02
    assert fallback_of(context) == (FallbackReason.BUDGET_EXHAUSTED, "queued")
    assert context.decision is not None
    assert [c.result for c in context.decision.checks if c.check == "consent"] == ["not_read"]
    assert context.eligible == [1, 2, 3, 4, 5]  # the item rules still apply
    assert context.timings["queued"] == 60
    assert context.timings["features"] == context.timings["rank"] == 0.0


def test_a_budget_spent_before_the_ranker_does_not_call_it() -> None:
    scorer = Scorer()
    deps = services(score=scorer, fetcher=Features(delay_s=0.004))
    context = run(deps, budget_ms=3)
    # The fetch overran: a feature timeout, and the ranker is never asked.
    assert fallback_of(context) == (FallbackReason.FEATURE_TIMEOUT, None)
    assert scorer.calls == 0
    assert 2.0 < context.timings["features"] < 10.0


def test_a_slow_ranker_is_cut_off_at_the_deadline() -> None:
    deps = services(score=Scorer(delay_s=1.0))
    started = time.perf_counter()
    context = run(deps, budget_ms=10)
    assert time.perf_counter() - started < 0.05
    assert fallback_of(context) == (FallbackReason.BUDGET_EXHAUSTED, "ranker")
    assert context.model_ref is not None  # the canary's window counts it against v1
    assert 5.0 < context.timings["rank"] < 50.0


@pytest.mark.parametrize(
    ("deps", "reason"),
    [
        (services(explainers={}), "explainer_unavailable"),
        (services(explainers={"v1": Explainer(ValueError("shap"))}), "explainer_error"),
        # 3 rows at an estimated second each: more than the largest budget covers.
        (services(config={"explainer": {"ms_per_row_estimate": 1000}}), "budget_exhausted"),
    ],
)
def test_an_explanation_that_cannot_be_given_is_omitted_not_the_answer(
    deps: Services, reason: str
) -> None:
    context = run(deps, explain=True)
    assert context.fallback is None
    assert [item for item, _ in context.ranked] == [5, 4, 3]
    assert context.reasons is None
    assert context.explanation is not None
    assert (context.explanation.status, context.explanation.reason) == ("omitted", reason)


def test_no_explanation_asked_is_not_timed() -> None:
    context = run(services())
    assert context.explanation is None and context.timings["explain"] == 0.0


def test_nothing_eligible_is_an_empty_personalized_answer() -> None:
    deps = services(fetcher=Features(catalogue=[6]))
    scorer = deps.score
    context = run(deps)
    assert context.fallback is None and context.ranked == []
    assert context.model_ref is not None
    assert isinstance(scorer, Scorer) and scorer.calls == 0


def test_unknown_stage_names_are_config_errors() -> None:
    from rankgate.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'teleport'"):
        StageRunner.build(["gate", "teleport"], "rules", services())


# -- a new stage: one class and one config entry -----------------------------------


class InStock(Stage):
    """Drops the items that are out of stock (a toy: the stock is a class attribute)."""

    name = "in_stock"
    timing = "stock"
    on_timeout = StageResult.degraded(FallbackReason.BUDGET_EXHAUSTED, "in_stock")
    out_of_stock: ClassVar[set[int]] = {5}
    delay_s: ClassVar[float] = 0.0

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        await asyncio.sleep(self.delay_s)
        context.eligible = [i for i in context.eligible if i not in self.out_of_stock]
        return COMPLETED


WITH_STOCK = ["gate", "in_stock", "route", "fetch", "score", "explain"]


def test_a_new_stage_runs_under_the_deadline_and_is_timed() -> None:
    deps = services(config={"pipeline": {"stages": WITH_STOCK}})
    context = run(deps, stages=deps.config.pipeline.stages)
    assert [item for item, _ in context.ranked] == [4, 3, 2]  # 5 is out of stock
    assert list(context.timings) == ["queued", "policy", "stock", "features", "rank", "explain"]
    assert context.timings["stock"] > 0


def test_a_new_stage_degrades_with_its_reason_when_the_deadline_is_spent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(InStock, "delay_s", 1.0)
    started = time.perf_counter()
    context = run(services(), budget_ms=10, stages=WITH_STOCK)
    assert time.perf_counter() - started < 0.05
    assert fallback_of(context) == (FallbackReason.BUDGET_EXHAUSTED, "in_stock")
    assert 5.0 < context.timings["stock"] < 50.0
    assert context.timings["features"] == 0.0
