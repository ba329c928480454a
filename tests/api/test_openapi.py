"""The OpenAPI builder as a plain function (the served document: tests/api/test_http.py)."""

from __future__ import annotations

from serving.contract.config import BudgetConfig, LimitsConfig
from serving.contract.schemas import RequestRules
from serving.http.ingress import api
from serving.http.openapi import MAX_LISTED_ITEM_IDS, item_id_schema, openapi_document


def test_item_ids_are_a_range_or_a_list() -> None:
    assert item_id_schema(range(80)) == {"type": "integer", "minimum": 0, "maximum": 79}
    assert item_id_schema([3, 9, 4]) == {
        "type": "integer",
        "minimum": 3,
        "maximum": 9,
        "enum": [3, 4, 9],
    }
    sparse = range(0, 2 * (MAX_LISTED_ITEM_IDS + 1), 2)  # too many to list: the range only
    assert "enum" not in item_id_schema(sparse)
    assert item_id_schema([]) == {"type": "integer", "not": {}}


def test_the_document_reads_the_rules_it_is_given() -> None:
    limits = LimitsConfig(max_k=7, max_user_id_chars=40)
    rules = RequestRules.of(limits, BudgetConfig(max_ms=300), ["a_purpose"], ["XX"], [1, 2])
    document = openapi_document(api, rules)
    body = document["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]
    props = body["schema"]["properties"]
    assert props["k"]["maximum"] == 7
    for name in ("user_id", "anonymous_id"):
        assert props[name]["anyOf"][0]["maxLength"] == 40, name
    linking = document["paths"]["/v1/identify"]["post"]["requestBody"]["content"]
    link_props = linking["application/json"]["schema"]["properties"]
    assert link_props["anonymous_ids"]["items"]["maxLength"] == 40
    assert link_props["region"]["anyOf"][0]["enum"] == ["XX"]
    assert props["purpose"]["enum"] == ["a_purpose"] and props["region"]["enum"] == ["XX"]
    assert props["budget_ms"]["anyOf"][0]["maximum"] == 300
    # Before the first config is loaded the bodies are still described, by type.
    bare = openapi_document(api, None)["paths"]["/v1/consent"]["post"]["requestBody"]
    assert "user_id" in bare["content"]["application/json"]["schema"]["properties"]


def test_the_consent_signals_are_documented_in_the_body_and_as_headers() -> None:
    rules = RequestRules.of(LimitsConfig(), BudgetConfig(), ["a_purpose"], ["XX"], [1, 2])
    for document in (openapi_document(api, rules), openapi_document(api, None)):
        rank = document["paths"]["/v1/rank"]["post"]
        schema = rank["requestBody"]["content"]["application/json"]["schema"]
        assert "$defs" not in schema  # nothing left to point into
        consent = schema["properties"]["consent"]["anyOf"][0]
        assert set(consent["properties"]) == {"tcf", "gpc"}
        assert consent["additionalProperties"] is False
        assert consent["properties"]["tcf"]["anyOf"][0]["format"] == "iab-tcf-tc-string"
        headers = {p["name"] for p in rank["parameters"] if p["in"] == "header"}
        assert {"Sec-GPC", "Rankgate-TCF"} <= headers
