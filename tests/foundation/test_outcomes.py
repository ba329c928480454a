"""One vocabulary of fallback reasons: the enum, the metrics and the API guide agree."""

from __future__ import annotations

import json
import re

from serving.contract.reasons import DEGRADED, FallbackReason
from serving.contract.schemas import Fallback, PolicyBlock, RankRequest, RankResponse
from serving.observe.metrics import ServingMetrics
from tests import REPO

# A purpose of its own: once Feast has turned on prometheus_client's multiprocess
# mode (PROMETHEUS_MULTIPROC_DIR), values are per process and label set, whichever
# registry counts them.
REQUEST = RankRequest.model_construct(user_id="u-1", purpose="test_outcomes", region="EU")


def answer(reason: FallbackReason | None) -> RankResponse:
    decision = "personalize" if reason is None else "non_personalized"
    return RankResponse(
        request_id="r",
        items=[],
        model=None,
        fallback=None if reason is None else Fallback(reason=reason, strategy="popularity"),
        policy=PolicyBlock(decision=decision, version="1", checks=[]),
        timings_ms={},
    )


def test_the_api_guide_table_names_exactly_the_reasons() -> None:
    guide = (REPO / "docs" / "api.md").read_text()
    table = guide.split("| `fallback.reason` | counts as | when |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name: kind.strip() == "degraded"
        for row in table.splitlines()[1:]
        for cell, kind in [row.split("|")[1:3]]
        for name in re.findall(r"`([a-z_]+)`", cell)
    }
    assert documented == {reason.value: reason.degraded for reason in FallbackReason}


def test_answers_carry_the_public_strings() -> None:
    fallback = Fallback(reason=FallbackReason.FEATURES_STALE, strategy="popularity")
    assert fallback.model_dump_json(exclude_unset=True) == (
        '{"reason":"features_stale","strategy":"popularity"}'
    )
    assert json.dumps(fallback.model_dump(exclude_unset=True)) == (
        '{"reason": "features_stale", "strategy": "popularity"}'
    )


def test_decisions_are_not_degraded() -> None:
    assert DEGRADED == {r for r in FallbackReason if r.degraded}
    decisions = {r for r in FallbackReason if not r.degraded}
    assert decisions == {
        FallbackReason.NO_CONSENT,
        FallbackReason.GPC_OBJECTION,
        FallbackReason.TCF_NO_CONSENT,
        FallbackReason.NO_PERMITTED_MODEL,
        FallbackReason.RESIDENCY,
        FallbackReason.FEATURES_MISSING,
    }
    assert {r for r in FallbackReason if r.model_fault} <= DEGRADED


def test_metrics_count_degraded_answers_by_the_reason() -> None:
    metrics = ServingMetrics()
    for reason in (None, *FallbackReason):
        metrics.observe(REQUEST, answer(reason))
    counted = {
        sample.labels["outcome"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "rankgate_rank_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {
        "personalized": 1,
        "degraded": len(DEGRADED),
        "non_personalized": len(FallbackReason) - len(DEGRADED),
    }
