"""AuditRecord reads and writes the stored format of the audit stream, byte for byte."""

from __future__ import annotations

import json

from serving.contract.reasons import FallbackReason
from serving.observe.audit import AuditRecord

# As the stream keeps them: a personalized decision with reasons, and a fallback
# with a detail from a record older than API keys (no "app").
PERSONALIZED = (
    '{"request_id":"4e19bf243b4e43158f75967f4444464e","at":1795428534.1707003,"app":"shop",'
    '"user_key":"9f1ddb49a719af4717152be01dab9ea3","purpose":"onsite_personalization",'
    '"region":"US","k":2,"policy":{"decision":"personalize","version":"2026-11-22.1",'
    '"checks":[{"check":"purpose","result":"onsite_personalization"},'
    '{"check":"consent","result":"granted","detail":"opt_out region: satisfied"}]},'
    '"model":{"name":"ranker","version":"v2","variant":"stable"},"candidates":[5,3,9],'
    '"features":{"values":{"affinity_0":0.0,"user_feature_0":"81ce123cbb5bd8ce"},'
    '"age_s":{"user_item_affinity":3.092251,"visitor_profile":3.092251}},'
    '"item_table":"5f0c2a","items":[[9,0.008573],[3,0.007132]],"fallback":null,'
    '"explanation":[[{"feature":"item_feature_2","group":"item","contribution":0.514277,'
    '"text":"Its attributes (item_feature_2) suit what you tend to choose"}],[]],'
    '"timings_ms":{"queued":0.0,"policy":2.174,"features":1.233,"total":13.985}}'
)
FALLBACK_WITHOUT_APP = (
    '{"request_id":"b2495f8819d74a1d9db54fa71068549d","at":1795428534.17874,'
    '"user_key":"9f1ddb49a719af4717152be01dab9ea3","purpose":"email_marketing","region":"EU",'
    '"k":10,"policy":{"decision":"non_personalized","version":"2026-11-22.1",'
    '"checks":[{"check":"consent","result":"not_read","detail":"budget spent queued"}]},'
    '"model":null,"candidates":["sku-2","sku-1"],"features":null,"item_table":null,'
    '"items":[["sku-1",0.010989],["sku-2",0.008451]],'
    '"fallback":{"reason":"budget_exhausted","strategy":"popularity","detail":"queued"},'
    '"explanation":null,"timings_ms":{"queued":60.1,"total":60.2}}'
)


def test_records_are_written_back_exactly_as_stored() -> None:
    for raw in (PERSONALIZED, FALLBACK_WITHOUT_APP):
        assert AuditRecord.read(raw).stored() == raw


def test_fields_are_typed() -> None:
    record = AuditRecord.read(PERSONALIZED)
    assert record.model is not None and record.model.version == "v2"
    assert record.items == [(9, 0.008573), (3, 0.007132)] and record.candidates == [5, 3, 9]
    assert record.explanation is not None and record.explanation[0][0].feature == "item_feature_2"
    fallback = AuditRecord.read(FALLBACK_WITHOUT_APP)
    assert fallback.app is None and fallback.candidates == ["sku-2", "sku-1"]
    assert fallback.fallback is not None
    assert fallback.fallback.reason == FallbackReason.BUDGET_EXHAUSTED


def test_tail_shows_the_record_with_its_stream_id() -> None:
    record = AuditRecord.read(PERSONALIZED, stream_id=b"1795428534170-0")
    assert record.stored() == PERSONALIZED
    assert record.shown() == json.dumps(
        {**json.loads(PERSONALIZED), "stream_id": "1795428534170-0"}
    )
