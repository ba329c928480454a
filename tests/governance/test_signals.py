"""Consent signals in the request: parsed, then counted by the gate as the policy says.

Plain classes, no Ray: the example project's policy (its US region counts GPC as an
objection to onsite_personalization; its EU region maps TCF purposes to both purposes,
vendor id 1) and the IAB's published TC strings (tests/governance/iab_strings.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from rankgate.governance.consent import ConsentState
from rankgate.governance.policy import Policy, VendorListVersions, load_policy
from rankgate.governance.signals import ConsentSignals, ConsentSource
from rankgate.governance.tcf import decode
from serving.contract.config import BudgetConfig, LimitsConfig
from serving.contract.parsing import BadRequest, parse_rank
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import RequestRules
from serving.ranking.gate import ConsentGate, GateDecision
from tests.governance.iab_strings import ALL_SEGMENTS, CORE_ONLY, RESTRICTIONS, V2_3

ONSITE, EMAIL = "onsite_personalization", "email_marketing"
# RESTRICTIONS grants TCF purposes 1-10 and consent for vendor 1 (and 478 others);
# CORE_ONLY grants purposes 2 and 10, no vendor; V2_3 grants purposes 1-11 but not vendor 1.
GRANTS, DENIES, NO_VENDOR = RESTRICTIONS, CORE_ONLY, V2_3


def checks(decision: GateDecision) -> dict[str, tuple[str, str | None]]:
    return {c.check: (c.result, c.detail) for c in decision.checks}


@pytest.fixture
def gate() -> ConsentGate:
    return ConsentGate(load_policy())


def tcf(text: str, field: str = "consent.tcf") -> ConsentSignals:
    return ConsentSignals(tcf=decode(text), tcf_field=field)


def test_without_signals_the_stored_record_decides_as_before(gate: ConsentGate) -> None:
    decision = gate.decide(ONSITE, "US", ConsentState.UNKNOWN)
    assert decision.personalize and decision.signals is None
    assert checks(decision)["consent_source"] == ("stored", None)
    assert decision is gate.decide(ONSITE, "US", ConsentState.UNKNOWN, signals=ConsentSignals())


def test_gpc_in_the_us_objects_to_onsite_personalization(gate: ConsentGate) -> None:
    decision = gate.decide(ONSITE, "US", ConsentState.GRANTED, signals=ConsentSignals(gpc=True))
    assert not decision.personalize and decision.allowed_views == frozenset()
    assert decision.reason is FallbackReason.GPC_OBJECTION and not decision.reason.degraded
    assert decision.source is ConsentSource.GPC
    assert checks(decision)["gpc"] == (
        "objection",
        "regions.US.gpc objects to onsite_personalization",
    )
    assert checks(decision)["consent_source"][0] == "gpc"


@pytest.mark.parametrize(
    ("purpose", "region", "stored"),
    [(ONSITE, "EU", ConsentState.GRANTED), (EMAIL, "US", ConsentState.GRANTED)],
)
def test_gpc_where_the_policy_does_not_count_it_changes_nothing(
    gate: ConsentGate, purpose: str, region: str, stored: ConsentState
) -> None:
    decision = gate.decide(purpose, region, stored, signals=ConsentSignals(gpc=True))
    assert decision.personalize and decision.source is ConsentSource.STORED
    assert checks(decision)["gpc"][0] == "not_counted"


def test_a_stored_denial_decides_before_any_signal(gate: ConsentGate) -> None:
    signals = ConsentSignals(gpc=True)
    decision = gate.decide(ONSITE, "US", ConsentState.DENIED, signals=signals)
    assert decision.reason is FallbackReason.NO_CONSENT
    assert checks(decision)["consent_source"][0] == "stored"
    assert checks(decision)["gpc"][0] == "objection"  # stated, though it did not decide


def test_a_granting_tc_string_never_loosens_the_stored_consent(gate: ConsentGate) -> None:
    granted = gate.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(GRANTS))
    assert granted.personalize
    assert checks(granted)["tcf"] == ("granted", "purposes 1,5,6 and vendor 1: granted")
    # EU is opt-in: without a stored grant the string cannot personalize.
    unknown = gate.decide(ONSITE, "EU", ConsentState.UNKNOWN, signals=tcf(GRANTS))
    assert unknown.reason is FallbackReason.NO_CONSENT and unknown.source is ConsentSource.STORED


@pytest.mark.parametrize(
    ("purpose", "text", "lacks"),
    [
        (ONSITE, DENIES, "no consent to purposes 1,5,6; no consent for vendor 1"),
        (ONSITE, ALL_SEGMENTS, "no consent to purposes 1; no consent for vendor 1"),
        (ONSITE, NO_VENDOR, "purposes 1,5,6 and vendor 1: no consent for vendor 1"),
        (EMAIL, DENIES, "no consent to purposes 1,3,4"),
    ],
)
def test_a_tc_string_that_does_not_grant_the_mapped_purposes_and_vendor(
    gate: ConsentGate, purpose: str, text: str, lacks: str
) -> None:
    decision = gate.decide(purpose, "EU", ConsentState.GRANTED, signals=tcf(text))
    assert not decision.personalize and decision.reason is FallbackReason.TCF_NO_CONSENT
    assert decision.source is ConsentSource.TCF
    result, detail = checks(decision)["tcf"]
    assert result == "not_granted" and detail is not None and lacks in detail
    assert checks(decision)["consent_source"][0] == "tcf"


def test_a_tc_string_where_the_policy_maps_no_tcf_purposes_is_not_counted(
    gate: ConsentGate,
) -> None:
    decision = gate.decide(ONSITE, "US", ConsentState.UNKNOWN, signals=tcf(DENIES))
    assert decision.personalize
    assert checks(decision)["tcf"][0] == "not_counted"


def test_a_publisher_restriction_for_the_vendor_denies(gate: ConsentGate) -> None:
    # RESTRICTIONS requires consent for purpose 1 from vendors 7, 20, ... (they have it)
    # and legitimate interest from vendor 730: for 730 purpose 1 is not on consent.
    restricted = with_eu_tcf(vendor_id=730)
    decision = restricted.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(GRANTS))
    detail = checks(decision)["tcf"][1]
    assert detail is not None and "publisher restricts purposes 1" in detail
    assert decision.reason is FallbackReason.TCF_NO_CONSENT


def with_eu_tcf(**update: Any) -> ConsentGate:
    """A gate of the example policy with its EU region's TCF rule changed."""
    policy = load_policy()
    eu = policy.regions["EU"]
    assert eu.tcf is not None
    tcf_rule = eu.tcf.model_copy(update=update)
    regions = {**policy.regions, "EU": eu.model_copy(update={"tcf": tcf_rule})}
    return ConsentGate(policy.model_copy(update={"regions": regions}))


def test_an_unknown_vendor_list_version_is_stated() -> None:
    gate = with_eu_tcf(vendor_list_versions=VendorListVersions(min=100, max=140))
    old = gate.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(GRANTS))  # version 51
    assert old.personalize  # still applied: what it grants is read from its bits
    assert checks(old)["tcf_vendor_list"] == (
        "unknown",
        "51 is not among regions.EU.tcf.vendor_list_versions",
    )
    known = gate.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(NO_VENDOR))  # 141
    assert "tcf_vendor_list" in checks(known)
    assert "tcf_vendor_list" not in checks(gate.decide(EMAIL, "US", None, signals=tcf(GRANTS)))


def test_decisions_are_cached_by_the_signals_effect_and_the_stored_source(
    gate: ConsentGate,
) -> None:
    first = gate.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(GRANTS))
    # The same facts from the header: another decision (the audit says where it came from).
    header = gate.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(GRANTS, "Rankgate-TCF"))
    assert gate.decide(ONSITE, "EU", ConsentState.GRANTED, signals=tcf(GRANTS)) is first
    assert header is not first
    linked = gate.decide(ONSITE, "EU", ConsentState.GRANTED, stored_source="linked-id")
    assert checks(linked)["consent_source"][0] == "linked-id"
    assert linked.source is ConsentSource.LINKED_ID
    stored = gate.decide(ONSITE, "EU", ConsentState.GRANTED)
    assert checks(stored)["consent_source"][0] == "stored"
    assert len(gate.decisions) == 4


# Parsing: the rules of a replica, built from the example's policy and plain config.
POLICY: Policy = load_policy()
RULES = RequestRules.of(
    LimitsConfig(), BudgetConfig(), POLICY.purposes, POLICY.regions, range(1, 81)
)
BODY = {"user_id": "u-1", "purpose": ONSITE, "region": "EU"}


def parse(body: dict[str, Any], gpc: str | None = None, tcf_header: str | None = None):  # type: ignore[no-untyped-def]
    return parse_rank(json.dumps(body).encode(), RULES, gpc, tcf_header)


def test_a_request_without_signals_has_no_consent() -> None:
    assert parse(BODY).consent is None
    assert parse(BODY, gpc="0").consent is None  # only "1" is the signal


def test_signals_from_the_body_and_the_headers() -> None:
    body = parse({**BODY, "consent": {"tcf": GRANTS}}).consent
    assert body is not None and body.signals() == ConsentSignals(tcf=decode(GRANTS))
    header = parse(BODY, gpc="1", tcf_header=DENIES).consent
    assert header is not None
    assert header.signals() == ConsentSignals(
        gpc=True, tcf=decode(DENIES), tcf_field="Rankgate-TCF"
    )
    # The body's string wins over the header's; GPC from either.
    both = parse({**BODY, "consent": {"tcf": GRANTS, "gpc": True}}, tcf_header=DENIES).consent
    assert both is not None and both.signals() == ConsentSignals(gpc=True, tcf=decode(GRANTS))


@pytest.mark.parametrize(
    ("body", "tcf_header", "field", "problem"),
    [
        ({"consent": {"tcf": CORE_ONLY[:20]}}, None, "consent.tcf", "truncated"),
        ({"consent": {"tcf": "not a string!"}}, None, "consent.tcf", "not base64url"),
        ({"consent": {"tcf": 7}}, None, "consent.tcf", "valid string"),
        ({"consent": {"gpc": "1"}}, None, "consent.gpc", "valid boolean"),
        ({"consent": {"iab": GRANTS}}, None, "consent.iab", "unknown field"),
        ({}, "CPxx!!", "Rankgate-TCF", "not a TCF v2 TC string"),
    ],
)
def test_a_malformed_signal_is_a_422_naming_its_field(
    body: dict[str, Any], tcf_header: str | None, field: str, problem: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        parse({**BODY, **body}, tcf_header=tcf_header)
    assert caught.value.status_code == 422
    assert [(p.field, problem in p.problem) for p in caught.value.problems] == [(field, True)]


def test_a_bad_header_and_a_bad_body_field_come_together() -> None:
    with pytest.raises(BadRequest) as caught:
        parse({**BODY, "k": 0}, tcf_header=CORE_ONLY[:20])
    assert [p.field for p in caught.value.problems] == ["k", "Rankgate-TCF"]
